#!/usr/bin/env node
// Breakwater macro benchmark: upstream + load generator on CPU 0, each proxy
// on CPU 1, interleaved rounds, medians. See bench/README.md.
import { mkdtempSync, rmSync, writeFileSync, readFileSync, mkdirSync } from 'node:fs'
import { tmpdir, cpus, release, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { spawnSync } from 'node:child_process'
import { parseArgs } from 'node:util'
import {
  cpuStat, cpuBusyPct, processTable, otherCpuPct, treeCpuNs, treeRssKiB, treeFdCount, processTree, establishedOnPort, acceptedOnPort, tcpExt
} from './lib/procfs.mjs'
import { hasTaskset, pinTree, sleep, stopAll, stopProcess, killAllNow } from './lib/processes.mjs'
import { runLoad } from './lib/load.mjs'
import {
  ALL_TARGETS, LOADGEN_CPU, PROXY_CPU, SHIPPED_NODE_FLAGS, startUpstream, startTarget, targetAvailability, tools
} from './lib/targets.mjs'
import {
  summariseLoad, summariseMemory, throughputTable, ratioTable, addedLatencyTable, tailTable, memoryTable, machineTable
} from './lib/report.mjs'

const benchDir = dirname(fileURLToPath(import.meta.url))
const repoRoot = resolve(benchDir, '..')

const SCENARIO_NAMES = ['c50', 'c200', 'rate2000', 'c1-samecpu', 'memory']
const OTHER_CPU_LIMIT = 10 // % of one core; a run above this is measured once more
const IDLE_LIMIT = 15 // % busy over all CPUs for the pre-flight check
const MAX_ATTEMPTS = 3 // measurements of one target/scenario/round when disturbed
const RETRY_BUDGET_S = 60 // total time spent on repeated measurements, so a busy machine cannot stretch the run indefinitely
let retrySpentS = 0
let runStarted = Date.now()
let retryBudgetS = RETRY_BUDGET_S // 0 with --quick: a smoke test does not repeat disturbed runs

// ---------------------------------------------------------------- options

const HELP = `Usage: node bench/run.mjs [options]

  --rounds N         interleaved rounds per scenario (default 5; env BENCH_ROUNDS)
  --duration S       seconds per c50 run (default 10; env BENCH_DURATION); c200
                     runs 20 s, the other load scenarios min(S, 2) s
  --quick            smoke test: 1 round, 2 s c50 and c200 runs, 1 s for the rest
  --targets a,b      subset of: ${ALL_TARGETS.join(', ')} (env BENCH_TARGETS)
  --scenarios a,b    subset of: ${SCENARIO_NAMES.join(', ')} (env BENCH_SCENARIOS)
  --json FILE        write every measurement and the summaries as JSON (env BENCH_JSON)
  --node-upstream    use bench/upstream.mjs as the upstream even if nginx is installed
  --keep-tmp         keep the generated configs and process logs
  -h, --help
`

function usage (message) {
  return Object.assign(new Error(message), { usage: true })
}

function options () {
  let parsed
  try {
    parsed = parseArgs({
      options: {
        rounds: { type: 'string' },
        duration: { type: 'string' },
        quick: { type: 'boolean', default: false },
        targets: { type: 'string' },
        scenarios: { type: 'string' },
        json: { type: 'string' },
        'node-upstream': { type: 'boolean', default: false },
        'keep-tmp': { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false }
      }
    })
  } catch (err) {
    throw usage(err.message)
  }
  const { values } = parsed
  if (values.help) {
    process.stdout.write(HELP)
    process.exit(0)
  }
  const env = process.env
  const quick = values.quick || env.BENCH_QUICK === '1'
  const rounds = Number(values.rounds ?? env.BENCH_ROUNDS ?? (quick ? 1 : 5))
  const duration = Number(values.duration ?? env.BENCH_DURATION ?? (quick ? 2 : 10))
  if (!Number.isInteger(rounds) || rounds < 1) throw usage('--rounds must be a positive integer')
  if (!(duration > 0)) throw usage('--duration must be > 0')
  const list = (v, all, what) => {
    if (!v) return [...all]
    const names = v.split(',').map((s) => s.trim()).filter(Boolean)
    for (const n of names) if (!all.includes(n)) throw usage(`unknown ${what} "${n}" (known: ${all.join(', ')})`)
    return all.filter((n) => names.includes(n))
  }
  let targets = list(values.targets ?? env.BENCH_TARGETS, ALL_TARGETS, 'target')
  // Added latency and the ×direct column need the direct baseline.
  if (!targets.includes('direct')) targets = ['direct', ...targets]
  const scenarios = list(values.scenarios ?? env.BENCH_SCENARIOS, SCENARIO_NAMES, 'scenario')
  const short = quick ? 1 : Math.min(duration, 2)
  const tail = quick ? 2 : 20
  const scenarioDefs = {
    c50: { name: 'c50', kind: 'throughput', connections: 50, duration, warmup: quick ? 0.3 : 0.5, title: `GET /, c=50, closed loop, ${duration} s × ${rounds} rounds` },
    c200: { name: 'c200', kind: 'tail', connections: 200, duration: tail, warmup: quick ? 0.3 : 0.5, title: `GET /, c=200, closed loop, ${tail} s × ${rounds} rounds` },
    rate2000: { name: 'rate2000', kind: 'added', connections: 10, overallRate: 2000, duration: short, warmup: 0.3, title: `GET /, c=10, overallRate 2,000 req/s, ${short} s × ${rounds} rounds` },
    'c1-samecpu': { name: 'c1-samecpu', kind: 'added', connections: 1, duration: short, warmup: 0.3, samecpu: true, title: `GET /, c=1, upstream + load generator + proxy all on CPU ${PROXY_CPU}, ${short} s × ${rounds} rounds` },
    memory: { name: 'memory', kind: 'memory', connections: 1000, hold: quick ? 1 : 2, maxDuration: 15, rounds: Math.min(rounds, 3), title: '' }
  }
  scenarioDefs.memory.title = `fresh process, c=1000 closed-loop keep-alive connections; RSS sampled ${scenarioDefs.memory.hold} s after the proxy has accepted all 1,000; ${scenarioDefs.memory.rounds} rounds`
  return {
    quick,
    rounds,
    duration,
    targets,
    scenarios: scenarios.map((n) => scenarioDefs[n]),
    json: values.json ?? env.BENCH_JSON ?? null,
    nodeUpstream: values['node-upstream'] || env.BENCH_NODE_UPSTREAM === '1',
    keepTmp: values['keep-tmp'],
    globalWarmup: quick ? 0.5 : 1
  }
}

const log = (...a) => process.stderr.write(a.join(' ') + '\n')

// ---------------------------------------------------------------- machine

function firstLine (cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' })
  if (r.error || r.status !== 0) return null
  return (r.stdout || r.stderr).trim().split('\n')[0]
}

function pkgVersion (name) {
  try {
    return JSON.parse(readFileSync(join(repoRoot, 'node_modules', name, 'package.json'), 'utf8')).version
  } catch {
    return 'not installed'
  }
}

function machineInfo (upstreamKind) {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8')
  const field = (k) => (new RegExp(`^${k}\\s*:\\s*(.*)$`, 'm').exec(cpuinfo) ?? [])[1]
  const osName = (() => {
    try {
      return /^PRETTY_NAME="?([^"\n]*)"?/m.exec(readFileSync('/etc/os-release', 'utf8'))[1]
    } catch {
      return 'unknown'
    }
  })()
  const breakwaterVersion = (() => {
    try {
      return JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')).version
    } catch {
      return '?'
    }
  })()
  return {
    date: new Date().toISOString(),
    'CPUs (nproc)': cpus().length,
    'CPU model': `${field('model name') ?? '?'}${field('cpu MHz') ? `, ${field('cpu MHz')} MHz` : ''}`,
    memory: `${Math.round(totalmem() / 1024 / 1024)} MiB`,
    'OS / kernel': `${osName} / ${release()}`,
    Node: process.version,
    breakwater: `${breakwaterVersion} (git ${firstLine('git', ['-C', repoRoot, 'rev-parse', '--short', 'HEAD']) ?? 'no commit'})`,
    upstream: upstreamKind === 'nginx' ? `nginx (${firstLine(tools.nginx, ['-v']) ?? '?'}), 1 worker, CPU ${LOADGEN_CPU}` : `node:http (bench/upstream.mjs), CPU ${LOADGEN_CPU}`,
    nginx: tools.nginx ? firstLine(tools.nginx, ['-v']) : 'not installed',
    haproxy: tools.haproxy ? firstLine(tools.haproxy, ['-v']) : 'not installed',
    autocannon: pkgVersion('autocannon'),
    fastify: pkgVersion('fastify'),
    '@fastify/http-proxy': pkgVersion('@fastify/http-proxy'),
    '@fastify/reply-from': pkgVersion('@fastify/reply-from'),
    undici: pkgVersion('undici'),
    pinning: hasTaskset ? `taskset: load generator + upstream CPU ${LOADGEN_CPU}, proxies CPU ${PROXY_CPU}` : 'taskset not found: NOT pinned',
    'memory limit per Node target': Number(process.env.BENCH_MEMORY_LIMIT_MIB ?? 0) > 0 ? `${process.env.BENCH_MEMORY_LIMIT_MIB} MiB (a cgroup each, BENCH_MEMORY_LIMIT_MIB)` : 'none',
    'Node flags of breakwater targets': process.env.BENCH_NODE_FLAGS ?? `${SHIPPED_NODE_FLAGS.join(' ')} (as shipped)`
  }
}

// ---------------------------------------------------------------- pre-flight

async function waitIdle (maxTries = 5, sampleMs = 3000) {
  const tries = []
  for (let i = 0; i < maxTries; i++) {
    const a = cpuStat()
    await sleep(sampleMs)
    const busy = cpuBusyPct(a, cpuStat()).cpu
    tries.push(Math.round(busy * 10) / 10)
    if (busy < IDLE_LIMIT) return { idle: true, busyPct: tries }
    log(`  machine ${busy.toFixed(0)} % busy, waiting…`)
  }
  log('  machine did not become idle; continuing anyway')
  return { idle: false, busyPct: tries }
}

// ---------------------------------------------------------------- measuring

const state = {
  upstream: null,
  targets: [] // { name, status: 'ok' | reason, live, instance }
}

/** Run one measured load against a target, with CPU/RSS accounting. */
async function measureOnce (t, sc, loadOpts) {
  const pids = t.live?.proc ? t.live.pids() : []
  const others = state.targets.filter((o) => o !== t && o.live?.proc).map((o) => ({ name: o.name, pids: o.live.pids() }))
  const bgPids = others.flatMap((o) => o.pids)
  let bgEach0
  let snap0
  const w0 = process.hrtime.bigint()
  const r = await runLoad({
    url: t.live.url,
    connections: sc.connections,
    duration: loadOpts.duration,
    overallRate: sc.overallRate,
    tail: sc.kind === 'tail',
    during: loadOpts.during,
    onInstance: loadOpts.onInstance,
    onStart: () => {
      bgEach0 = others.map((o) => treeCpuNs(o.pids))
      snap0 = { stat: cpuStat(), table: processTable(), cpu: treeCpuNs(pids), bg: treeCpuNs(bgPids), tcp: tcpExt(), t: process.hrtime.bigint() }
    }
  })
  const snap1 = { cpu: treeCpuNs(pids), bg: treeCpuNs(bgPids), tcp: tcpExt(), stat: cpuStat(), table: processTable(), t: process.hrtime.bigint() }
  const bgEach1 = others.map((o) => treeCpuNs(o.pids))
  const wallS = Number(snap1.t - snap0.t) / 1e9
  const busy = cpuBusyPct(snap0.stat, snap1.stat)
  const other = otherCpuPct(snap0.table, snap1.table, process.pid, wallS)
  const cpuNs = snap1.cpu - snap0.cpu
  const out = {
    ...r,
    wallS,
    setupS: Number(snap0.t - w0) / 1e9,
    proxyCpuPct: pids.length ? (cpuNs / 1e9 / wallS) * 100 : null,
    cpuUsPerReq: pids.length && r.responses ? cpuNs / 1e3 / r.responses : null,
    cpu0BusyPct: busy.cpu0 ?? null,
    cpu1BusyPct: busy.cpu1 ?? null,
    stealJiffies: busy.cpuStealJiffies ?? null,
    otherCpuPct: other.pct,
    otherTop: other.topPids,
    idleTargetsCpuPct: bgPids.length ? ((snap1.bg - snap0.bg) / 1e9 / wallS) * 100 : 0,
    idleTargetsCpuPctEach: Object.fromEntries(others.map((o, i) => [o.name, Math.round(((bgEach1[i] - bgEach0[i]) / 1e9 / wallS) * 1000) / 10])),
    rssKiB: pids.length ? treeRssKiB(pids) : null,
    // machine-wide: connections dropped because an accept queue was full (listen backlog)
    listenOverflows: snap1.tcp.ListenOverflows - snap0.tcp.ListenOverflows
  }
  return out
}

async function measure (t, sc, round) {
  const base = { target: t.name, scenario: sc.name, round, atS: Math.round((Date.now() - runStarted) / 100) / 10 }
  if (sc.warmup) {
    await runLoad({ url: t.live.url, connections: sc.connections, duration: sc.warmup, overallRate: sc.overallRate })
    await sleep(100)
  }
  // A run disturbed by other processes is measured again (after waiting for
  // the machine to calm down); the least disturbed attempt is kept.
  let best = null
  const otherByAttempt = []
  for (let attempt = 1; attempt <= MAX_ATTEMPTS; attempt++) {
    const res = await measureOnce(t, sc, { duration: sc.duration })
    otherByAttempt.push(Math.round(res.otherCpuPct * 10) / 10)
    if (!best || res.otherCpuPct < best.otherCpuPct) best = res
    if (res.otherCpuPct <= OTHER_CPU_LIMIT || attempt === MAX_ATTEMPTS) break
    if (retrySpentS >= retryBudgetS) {
      if (retryBudgetS > 0) log(`  ${t.name}: other processes used ${res.otherCpuPct.toFixed(0)} % of a core; retry budget (${retryBudgetS} s) used up, keeping it`)
      break
    }
    log(`  ${t.name}: other processes used ${res.otherCpuPct.toFixed(0)} % of a core (${res.otherTop.map((p) => p.comm).join(', ')}); measuring again`)
    const r0 = Date.now()
    await waitIdle(3, 2000)
    if (sc.warmup) await runLoad({ url: t.live.url, connections: sc.connections, duration: sc.warmup, overallRate: sc.overallRate })
    retrySpentS += (Date.now() - r0) / 1000 + sc.duration
  }
  await sleep(200)
  return { ...base, ...best, attempts: otherByAttempt.length, otherCpuPctByAttempt: otherByAttempt }
}

function checkAlive (t) {
  if (t.live?.proc && t.live.proc.exited) {
    const info = t.live.proc.exitInfo ?? {}
    const oom = t.live.cgroup != null ? `; OOM kills in its ${process.env.BENCH_MEMORY_LIMIT_MIB} MiB cgroup: ${t.live.cgroup.oomKills()}` : ''
    t.status = `exited during the run (code ${info.code}, signal ${info.signal}${oom})`
    t.live = null
    return false
  }
  return true
}

const LOAD_TABLES = { throughput: throughputTable, added: addedLatencyTable, tail: tailTable }

const rotate = (xs, n) => xs.map((_, i) => xs[(i + n) % xs.length])

async function runLoadScenario (sc, opts, results) {
  log(`\n## ${sc.name}: ${sc.title}`)
  if (sc.samecpu) {
    pinTree(processTree(state.upstream.proc.pid), PROXY_CPU)
    pinTree(harnessLoadgenPids(), PROXY_CPU)
  }
  try {
    for (let round = 0; round < opts.rounds; round++) {
      const order = rotate(state.targets.filter((t) => t.live), round)
      for (const t of order) {
        if (!t.live) continue
        let m
        try {
          m = await measure(t, sc, round)
        } catch (err) {
          m = { target: t.name, scenario: sc.name, round, error: err.message }
        }
        if (!checkAlive(t)) m.error = t.status
        results.push(m)
        log(m.error
          ? `  round ${round + 1} ${t.name}: ERROR ${m.error}`
          : `  round ${round + 1} ${t.name.padEnd(19)} ${Math.round(m.reqPerSec).toString().padStart(6)} req/s  p50 ${m.p50?.toFixed(3)} p99 ${m.p99?.toFixed(3)} ms` +
            (sc.kind === 'tail'
              ? ` p99.9 ${m.p999?.toFixed(1)} max ${m.max?.toFixed(0)} ms, ${m.over1s} over 1 s; ramp ${m.rampS?.toFixed(2)} s, after it p99.9 ${m.afterRamp.p999?.toFixed(1)} max ${m.afterRamp.max?.toFixed(0)} ms; load generator delay max ${m.loadgenDelayMax.toFixed(0)} ms`
              : '') +
            `  cpu ${m.cpuUsPerReq ? m.cpuUsPerReq.toFixed(1) + ' µs/req' : '–'}  cpu0 ${m.cpu0BusyPct.toFixed(0)}%  other ${m.otherCpuPct.toFixed(1)}%` +
            (m.errors || m.non2xx || m.timeouts ? `  errors ${m.errors} timeouts ${m.timeouts} non2xx ${m.non2xx}` : ''))
      }
    }
  } finally {
    if (sc.samecpu) {
      pinTree(processTree(state.upstream.proc.pid), LOADGEN_CPU)
      pinTree(harnessLoadgenPids(), LOADGEN_CPU)
    }
  }
}

// The load generator is this process (all of its threads).
function harnessLoadgenPids () {
  return [process.pid]
}

async function restartTarget (t, opts) {
  if (t.live?.proc) await stopProcess(t.live.proc, 200)
  t.live?.cgroup?.remove()
  t.live = null
  t.instance++
  try {
    t.live = await startTarget(t.name, { tmp: opts.tmp, repoRoot, benchDir, upstream: state.upstream, instance: t.instance })
    return true
  } catch (err) {
    t.status = `failed to start: ${err.message.split('\n')[0]}`
    log(`  ${t.name}: ${err.message}`)
    return false
  }
}

async function runMemoryScenario (sc, opts, results) {
  log(`\n## memory: ${sc.title}`)
  for (let round = 0; round < sc.rounds; round++) {
    const order = rotate(state.targets.filter((t) => t.live && t.name !== 'direct'), round)
    for (const t of order) {
      if (!(await restartTarget(t, opts))) continue
      await sleep(500)
      const pids = t.live.pids()
      const rssIdleKiB = treeRssKiB(pids)
      const port = Number(new URL(t.live.url).port)
      const base = { target: t.name, scenario: sc.name, round }
      let m
      try {
        // Keep the load on until the target has accepted all connections
        // (a busy event loop can take seconds to drain its accept queue),
        // then sc.hold more seconds; then sample and stop.
        let hold = null
        let instance = null
        let timer = null
        const t0 = Date.now()
        const sample = (connectMs) => {
          const p = t.live?.pids() ?? []
          hold = {
            rssHoldKiB: treeRssKiB(p),
            fdsHold: treeFdCount(p),
            clientConnsHold: establishedOnPort(port),
            acceptedHold: acceptedOnPort(p, port),
            connectS: connectMs === null ? null : connectMs / 1000
          }
          instance?.stop()
        }
        const poll = () => {
          const elapsed = Date.now() - t0
          if (acceptedOnPort(t.live?.pids() ?? [], port) >= sc.connections) {
            timer = setTimeout(() => sample(elapsed), sc.hold * 1000)
          } else if (elapsed > (sc.maxDuration - sc.hold - 0.5) * 1000) {
            sample(null)
          } else {
            timer = setTimeout(poll, 250)
          }
        }
        const r = await measureOnce(t, sc, {
          duration: sc.maxDuration,
          onInstance: (i) => {
            instance = i
            timer = setTimeout(poll, 250)
          }
        })
        clearTimeout(timer)
        await sleep(500)
        m = { ...base, ...r, rssIdleKiB, ...hold, rssAfterKiB: t.live ? treeRssKiB(t.live.pids()) : null }
      } catch (err) {
        m = { ...base, error: err.message }
      }
      if (!checkAlive(t)) m.error = t.status
      results.push(m)
      const mib = (k) => (k == null ? '–' : (k / 1024).toFixed(1))
      log(m.error
        ? `  round ${round + 1} ${t.name}: ERROR ${m.error}`
        : `  round ${round + 1} ${t.name.padEnd(19)} RSS idle ${mib(m.rssIdleKiB)} MiB, holding ${mib(m.rssHoldKiB)} MiB (${m.acceptedHold} client connections accepted after ${m.connectS ?? '–'} s, ${m.fdsHold} fds), after ${mib(m.rssAfterKiB)} MiB; ${Math.round(m.reqPerSec)} req/s; listen overflows ${m.listenOverflows}` +
          (m.errors || m.non2xx || m.timeouts ? `  errors ${m.errors} timeouts ${m.timeouts} non2xx ${m.non2xx}` : ''))
      await sleep(300)
    }
  }
}

// ---------------------------------------------------------------- main

let tmp = null
let keepTmp = false

function cleanupSync () {
  killAllNow()
  if (tmp && !keepTmp) {
    try {
      rmSync(tmp, { recursive: true, force: true })
    } catch {}
  }
}

process.on('exit', cleanupSync)
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    log(`\n${sig}: stopping every process started by the benchmark`)
    cleanupSync()
    process.exit(sig === 'SIGINT' ? 130 : 143)
  })
}

async function main () {
  const opts = options()
  keepTmp = opts.keepTmp
  if (opts.quick) retryBudgetS = 0
  tmp = mkdtempSync(join(tmpdir(), 'breakwater-bench-'))
  opts.tmp = tmp
  if (keepTmp) log(`configs and process logs: ${tmp}`)
  const started = Date.now()
  runStarted = started
  if (!hasTaskset) log('warning: taskset not found; processes are not pinned to CPUs')
  pinTree(harnessLoadgenPids(), LOADGEN_CPU)

  state.upstream = await startUpstream({ tmp, benchDir, forceNode: opts.nodeUpstream })
  log(`upstream: ${state.upstream.kind} on ${state.upstream.url}`)

  for (const name of opts.targets) {
    const t = { name, status: 'ok', live: null, instance: 0 }
    state.targets.push(t)
    const missing = targetAvailability(name)
    if (missing) {
      t.status = missing
      log(`target ${name}: skipped (${missing})`)
      continue
    }
    try {
      t.live = await startTarget(name, { tmp, repoRoot, benchDir, upstream: state.upstream, instance: 0 })
      log(`target ${name}: ready on ${t.live.url}`)
    } catch (err) {
      t.status = `failed to start: ${err.message.split('\n')[0]}`
      log(`target ${name}: FAILED TO START: ${err.message}`)
    }
  }
  if (!state.targets.find((t) => t.name === 'direct').live) throw new Error('direct target unavailable')

  const machine = machineInfo(state.upstream.kind)
  log('pre-flight: waiting for an idle machine')
  const preflight = await waitIdle(opts.quick ? 2 : 5)
  log(`pre-flight: CPU busy ${preflight.busyPct.join(', ')} %`)

  log(`global warm-up: ${opts.globalWarmup} s per target at c=50`)
  for (const t of state.targets) {
    if (!t.live) continue
    try {
      await runLoad({ url: t.live.url, connections: 50, duration: opts.globalWarmup })
    } catch (err) {
      log(`  warm-up ${t.name}: ${err.message}`)
    }
    checkAlive(t)
  }

  const results = []
  for (const sc of opts.scenarios) {
    if (sc.kind === 'memory') await runMemoryScenario(sc, opts, results)
    else await runLoadScenario(sc, opts, results)
  }
  await stopAll()
  const elapsedS = (Date.now() - started) / 1000

  // ------------------------------------------------------------ report
  const summaries = {}
  const md = []
  md.push(`### Run of ${machine.date} (${opts.rounds} round${opts.rounds > 1 ? 's' : ''}${opts.quick ? ', --quick' : ''}, ${Math.round(elapsedS)} s)`)
  md.push('')
  md.push(machineTable({ ...machine, 'pre-flight CPU busy % (3 s samples)': preflight.busyPct.join(', ') }))
  for (const sc of opts.scenarios) {
    const rs = results.filter((r) => r.scenario === sc.name)
    md.push('')
    md.push(`#### \`${sc.name}\`: ${sc.title}`)
    md.push('')
    if (sc.kind === 'memory') {
      const s = summariseMemory(state.targets, rs)
      summaries[sc.name] = s
      md.push(memoryTable(s))
    } else {
      const s = summariseLoad(sc, state.targets, rs)
      summaries[sc.name] = s
      md.push(LOAD_TABLES[sc.kind](s))
      if (sc.kind === 'throughput') {
        const rt = ratioTable(s, opts.rounds)
        if (rt) {
          md.push('')
          md.push('Per-round ratios against `fastify-http-proxy` measured in the same round (req/s: higher is better; CPU µs/req: lower is better):')
          md.push('')
          md.push(rt)
        }
      }
    }
  }
  const idleMax = Math.max(0, ...results.map((r) => r.idleTargetsCpuPct ?? 0))
  const repeated = results.filter((r) => r.attempts > 1).length
  md.push('')
  md.push(`Idle targets (the ones not under load) used at most ${idleMax.toFixed(1)} % of a core during any measurement. ` +
    `${repeated} measurement(s) were repeated because other processes used more than ${OTHER_CPU_LIMIT} % of a core.`)
  const failed = state.targets.filter((t) => t.status !== 'ok')
  if (failed.length) {
    md.push('')
    for (const t of failed) md.push(`- \`${t.name}\`: ${t.status}`)
  }
  process.stdout.write(md.join('\n') + '\n')

  if (opts.json) {
    const file = resolve(opts.json)
    mkdirSync(dirname(file), { recursive: true })
    writeFileSync(file, JSON.stringify({
      machine,
      preflight,
      options: { ...opts, tmp: undefined },
      upstream: { kind: state.upstream.kind },
      targets: state.targets.map((t) => ({ name: t.name, status: t.status })),
      elapsedS,
      summaries,
      results
    }, null, 2))
    log(`wrote ${file}`)
  }
  log(`done in ${Math.round(elapsedS)} s`)
}

main().then(() => {
  cleanupSync()
  process.exit(0)
}, (err) => {
  log(err.usage ? `${err.message}\n\n${HELP}` : `bench failed: ${err.stack ?? err}`)
  cleanupSync()
  process.exit(1)
})
