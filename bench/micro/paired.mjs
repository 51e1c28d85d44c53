// What a feature costs per request, measured on two identical sidecars that run at the same time
// on the same CPU and swap variants every window, so that neither the host's speed nor one
// process's luck (its JIT's choices, its heap) can pass for the feature's cost.
//
// On a shared host the CPU time of a request moves by 2× from one second to the next (other
// tenants take the core's caches and frequency; steal is excluded from the run time but its
// after-effects are not). Windows taken one after another (bench/micro/trace-path.mjs) pair
// badly under that; end-to-end runs (bench/run.mjs) compare two processes over different
// seconds. Here:
//
//   - two sidecars (dist/, same config) are children pinned to CPU 1, sharing it; a third child
//     on CPU 0 runs an upstream per sidecar (no HTTP parser: a canned "ok\n" per request head,
//     so that the load's core does not limit the sidecars), the OTLP collector (node:http) and
//     one autocannon per sidecar (closed loop, c=25 each by default; `--rate N`: N requests/s
//     each, the same for both variants, so the load side works alike whatever the variant);
//   - every round compares variant B with A in two windows: sidecar P runs A while Q runs B,
//     then P runs B while Q runs A. In each window both ran through the same host moments, so
//     their CPU per request (schedstat run time of all threads / requests answered) pairs
//     well; over the two windows each process ran each variant once, so a process's own speed
//     cancels too. The round's ratio is the geometric mean of the two windows' B/A ratios;
//     the report is the median over rounds, with the quartiles.
//
// Variants (each sidecar switches in-process, so both stay warm):
//   trace-off | trace-export | trace-sample1 | trace-encode | trace-ids | trace-sample1-encode   tracing exporter (the sidecar is
//       started with tracing at sampleRatio 1; `off` sets the data plane's exporter to none,
//       `sample1` samples 1 % of new traces through the real exporter, `encode` writes the
//       spans into batches and throws them away, `ids` samples nothing: ids and `traceparent` alone,
//       `sample1-encode` samples 1 % into batches that are thrown away: no export);
//   log-off | log-on | log-sample10    `logging.accessLog` false / true / 0.1, lines to stdout,
//       which is /dev/null here (as bench/run.mjs's `breakwater-log`);
//   floor | floor-contract | sidecar    the sidecar's port served by the hand-written forwarding
//       floor (bench/proxies/node-floor.mjs) instead of Breakwater, by the same floor sending the
//       four request headers of SPEC §3 as well, or by Breakwater as configured.
//
// `--config stages` configures every stage (kill switch, circuit breaker, two rollback triggers,
// the access log sampled at 0.1; sidecar-config.mjs) instead of a plain route: with
// `--pairs floor:sidecar`, the cost of Breakwater with every stage on over the floor.
//
//   node bench/micro/paired.mjs --pairs trace-off:trace-export,trace-off:trace-sample1 [--rounds 20] [--window 1000] [--settle 200] [--connections 25] [--rate 0] [--config plain|stages] [--sidecar-flags='--cpu-prof …'] [--restarts 1]
//
// `--restarts N`: the whole run N times, each on fresh processes, the rounds of all pooled (and
// each set's median listed). On Node 24 the floor:sidecar ratio moved between 1.00 and 1.16
// from one set of processes to the next (bench/README.md, 2026-12-06).
import { fork, execFileSync } from 'node:child_process'
import { readdirSync, readFileSync, mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { fileURLToPath } from 'node:url'
import { benchSidecarInput } from './sidecar-config.mjs'
import { floorHandler } from '../proxies/node-floor.mjs'
import { rawUpstream } from '../lib/raw-upstream.mjs'
import { rpc, serve } from '../lib/rpc.mjs'

const { values } = parseArgs({
  options: {
    role: { type: 'string', default: 'parent' },
    upstream: { type: 'string', default: '' },
    collector: { type: 'string', default: '' },
    rounds: { type: 'string', default: '20' },
    window: { type: 'string', default: '1000' },
    settle: { type: 'string', default: '200' },
    pairs: { type: 'string', default: 'trace-off:trace-export,trace-off:trace-sample1' },
    connections: { type: 'string', default: '25' },
    rate: { type: 'string', default: '0' },
    config: { type: 'string', default: 'plain' },
    'sidecar-flags': { type: 'string', default: '' },
    restarts: { type: 'string', default: '1' }
  }
})

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function pin (pid, cpu) {
  try { execFileSync('taskset', ['-a', '-p', '-c', String(cpu), String(pid)], { stdio: 'ignore' }) } catch { console.error(`taskset failed: ${pid} not pinned`) }
}

/** CPU 0: an upstream per sidecar, the OTLP collector, and one closed-loop load per sidecar. */
async function load () {
  let spanBytes = 0
  const collector = createServer((req, res) => {
    req.on('data', (chunk) => { spanBytes += chunk.length })
    req.on('end', () => { res.end() })
  })
  collector.keepAliveTimeout = 120_000
  const upstreams = [rawUpstream(), rawUpstream()]
  const listen = (server) => new Promise((resolve) => server.listen(0, '127.0.0.1', () => { resolve(server.address().port) }))
  const collectorPort = await listen(collector)
  const upstreamPorts = [await listen(upstreams[0].server), await listen(upstreams[1].server)]
  const { default: autocannon } = await import('autocannon')
  const loads = []
  serve(async (m) => {
    if (m.type === 'ports') return { collectorPort, upstreamPorts }
    if (m.type === 'count') return { answered: upstreams.map((u) => u.answered), spanBytes }
    if (m.type === 'load') {
      m.ports.forEach((port) => {
        loads.push(autocannon({ url: `http://127.0.0.1:${port}/api/orders/1?page=2`, connections: m.connections, pipelining: 1, duration: 100_000, headers: { 'user-agent': 'bench-client/1.0' }, ...(m.rate > 0 ? { overallRate: m.rate } : {}) }))
      })
      return {}
    }
    for (const l of loads) l.stop()
    for (const server of [collector, ...upstreams.map((u) => u.server)]) { server.close(); server.closeAllConnections?.() }
    return {}
  })
}

function schedstat (path) {
  return Number(readFileSync(path, 'utf8').split(' ')[0])
}

/** Nanoseconds run by every thread of this process (steal excluded). */
function cpuNs () {
  let total = 0
  for (const tid of readdirSync('/proc/self/task')) {
    try { total += schedstat(`/proc/self/task/${tid}/schedstat`) } catch {} // a thread that just ended
  }
  return total
}

/** Context switches of every thread of this process: [voluntary, involuntary]. */
function contextSwitches () {
  const out = [0, 0]
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const status = readFileSync(`/proc/self/task/${tid}/status`, 'utf8')
      out[0] += Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(status)?.[1] ?? 0)
      out[1] += Number(/nonvoluntary_ctxt_switches:\s+(\d+)/.exec(status)?.[1] ?? 0)
    } catch {} // a thread that just ended
  }
  return out
}

/** CPU 1: one sidecar from dist/, switched between variants in-process. */
async function sidecar () {
  const { resolveConfig } = await import('../../dist/config/load.js')
  const { startSidecar } = await import('../../dist/sidecar.js')
  const { SpanQueue, ProtobufEncoding } = await import('../../dist/ops/tracing.js')
  const { SpanEncoder } = await import('../../dist/ops/otlp-protobuf.js')
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-bench-'))
  const upstream = values.upstream
  const collector = values.collector
  const { config } = resolveConfig(benchSidecarInput({ stateDir, upstream, collector, stages: values.config === 'stages' }))
  const s = await startSidecar(config, { adminToken: 'bench-token-0123456789abcdef0123' })
  const tracing = s.tracing
  const exporting = tracing.exporter
  const thrownAway = { export: (_batch, done) => { done({ code: 0 }) }, shutdown: async () => {} }
  const encoding = new ProtobufEncoding(new SpanEncoder({ 'service.name': 'bench', 'service.version': 'bench' }, { name: 'breakwater', version: '0.1.0' }), thrownAway, config.tracing.batch.maxSize)
  const encodeOnly = new SpanQueue(config.tracing, encoding, { exported: 0, dropped: { queue_full: 0, export_failed: 0 } }, s.logger)
  const sampledOne = { sampleRatio: 0.01, add: (ctx) => { exporting.add(ctx) } }
  const sampledNone = { sampleRatio: 0, add: () => {} }
  const sampledOneEncoded = { sampleRatio: 0.01, add: (ctx) => { encodeOnly.add(ctx) } }
  // A known cost, to check the bench: every request sampled, and its span costs 5 or 10 µs of spinning.
  const burning = (us) => ({ sampleRatio: 1, add: () => { const until = performance.now() + us / 1000; while (performance.now() < until); } })
  // The same 5 µs as work instead of waiting on the clock: a register-only loop of as many turns
  // as took 5 µs here before any load.
  let sink = 0
  const turn = (n) => { let x = sink; for (let i = 0; i < n; i++) x = (Math.imul(x, 31) + i) | 0; sink = x }
  const perTurnNs = (() => { turn(1e6); const t0 = process.hrtime.bigint(); turn(2e7); return Number(process.hrtime.bigint() - t0) / 2e7 })()
  // What the loop took in place, under load (its wall time; a register-only loop is CPU bound).
  const worked = { ns: 0, calls: 0 }
  const working = (us) => {
    const n = Math.round(us * 1000 / perTurnNs)
    return { sampleRatio: 1, add: () => { const t0 = process.hrtime.bigint(); turn(n); worked.ns += Number(process.hrtime.bigint() - t0); worked.calls++ } }
  }
  const variants = {
    'trace-off': () => { tracing.exporter = null },
    'trace-export': () => { tracing.exporter = exporting },
    'trace-sample1': () => { tracing.exporter = sampledOne },
    'trace-encode': () => { tracing.exporter = encodeOnly },
    'trace-ids': () => { tracing.exporter = sampledNone },
    'trace-sample1-encode': () => { tracing.exporter = sampledOneEncoded },
    'trace-burn5': () => { tracing.exporter = burning(5) },
    'trace-burn10': () => { tracing.exporter = burning(10) },
    'trace-work5': () => { tracing.exporter = working(5) },
    'log-off': () => { s.dataPlane.accessLogRate = 0 },
    'log-on': () => { s.dataPlane.accessLogRate = 1 },
    'log-sample10': () => { s.dataPlane.accessLogRate = 0.1 },
    // The same process and port, its requests served by the hand-written floor instead.
    sidecar: () => {},
    floor: () => { serveWith([floor.handler]) },
    'floor-contract': () => { serveWith([floorContract.handler]) }
  }
  const server = s.proxy.server
  const sidecarListeners = server.listeners('request')
  const floor = floorHandler(upstream)
  const floorContract = floorHandler(upstream, { contractHeaders: true })
  const serveWith = (listeners) => {
    server.removeAllListeners('request')
    for (const l of listeners) server.on('request', l)
  }
  const reset = () => { tracing.exporter = null; s.dataPlane.accessLogRate = config.logging.accessLogRate; serveWith(sidecarListeners) }
  reset()
  serve(async (m) => {
    if (m.type === 'port') return { port: s.proxy.server.address().port }
    if (m.type === 'set') {
      const apply = variants[m.variant]
      if (apply === undefined) return { error: `unknown variant ${m.variant}` }
      reset()
      apply()
      return {}
    }
    if (m.type === 'cpu') return { ns: cpuNs(), switches: contextSwitches() }
    if (m.type === 'worked') return { ...worked }
    reset()
    await floor.close()
    await floorContract.close()
    await s.close()
    rmSync(stateDir, { recursive: true, force: true })
    return {}
  })
}

function quantile (xs, q) {
  const s = [...xs].sort((a, b) => a - b)
  const at = (s.length - 1) * q
  const lo = Math.floor(at)
  return s[lo] + (s[Math.min(lo + 1, s.length - 1)] - s[lo]) * (at - lo)
}

async function parent () {
  const rounds = Number(values.rounds)
  const windowMs = Number(values.window)
  const settleMs = Number(values.settle)
  const pairs = values.pairs.split(',').map((p) => p.split(':'))
  const self = fileURLToPath(import.meta.url)
  const children = []
  process.on('exit', () => { for (const c of children) c.kill() })
  const spawn = (args, stdio, execArgv = []) => { const c = fork(self, args, { execArgv, stdio }); children.push(c); return c }
  const sidecarFlags = values['sidecar-flags'].split(' ').filter((f) => f !== '')

  const results = pairs.map(([a, b]) => ({ a, b, ratios: [], usA: [], usB: [], rate: [], byProcesses: [] }))
  const restarts = Number(values.restarts)
  // With --restarts N the whole run is repeated on N fresh sets of processes: each set keeps
  // whatever its JIT settled on, which the two sidecars of one set cancel only between them.
  for (let restart = 0; restart < restarts; restart++) {
    const ownFrom = children.length // this set's processes
    const loader = spawn(['--role', 'load'], ['ignore', 'inherit', 'inherit', 'ipc'])
    pin(loader.pid, 0)
    const toLoad = rpc(loader)
    const { collectorPort, upstreamPorts } = await toLoad({ type: 'ports' })
    const sidecars = [0, 1].map((i) => {
      const c = spawn(['--role', 'sidecar', '--upstream', `http://127.0.0.1:${upstreamPorts[i]}`, '--collector', `http://127.0.0.1:${collectorPort}`], ['ignore', 'ignore', 'inherit', 'ipc'], sidecarFlags)
      pin(c.pid, 1)
      return rpc(c)
    })
    const ports = await Promise.all(sidecars.map(async (call) => (await call({ type: 'port' })).port))
    await toLoad({ type: 'load', ports, connections: Number(values.connections), rate: Number(values.rate) })

    const window = async (assign) => {
      await Promise.all(assign.map(async (variant, i) => {
        const r = await sidecars[i]({ type: 'set', variant })
        if (r.error !== undefined) throw new Error(r.error)
      }))
      await sleep(settleMs)
      const [c0, ...t0] = await Promise.all([toLoad({ type: 'count' }), ...sidecars.map((call) => call({ type: 'cpu' }))])
      await sleep(windowMs)
      const [c1, ...t1] = await Promise.all([toLoad({ type: 'count' }), ...sidecars.map((call) => call({ type: 'cpu' }))])
      return [0, 1].map((i) => {
        const n = c1.answered[i] - c0.answered[i]
        return { n, us: (t1[i].ns - t0[i].ns) / 1000 / n, vol: (t1[i].switches[0] - t0[i].switches[0]) / n, invol: (t1[i].switches[1] - t0[i].switches[1]) / n }
      })
    }

    // Warm up both sidecars on every variant named.
    const named = [...new Set(pairs.flat())]
    for (const v of named) await window([v, v])

    const from = results.map((res) => res.ratios.length)
    for (let r = 0; r < rounds; r++) {
      const line = []
      for (const res of results) {
        // P runs A while Q runs B, then the other way round; which comes first alternates by round.
        const first = r % 2 === 0 ? [res.a, res.b] : [res.b, res.a]
        const w1 = await window(first)
        const w2 = await window([first[1], first[0]])
        const [pA, qB] = first[0] === res.a ? [w1[0], w1[1]] : [w2[0], w2[1]]
        const [pB, qA] = first[0] === res.a ? [w2[0], w2[1]] : [w1[0], w1[1]]
        const ratio = Math.sqrt((qB.us / pA.us) * (pB.us / qA.us))
        res.ratios.push(ratio)
        res.usA.push((pA.us + qA.us) / 2)
        res.usB.push((pB.us + qB.us) / 2)
        res.rate.push((pA.n + qA.n + pB.n + qB.n) / 2 / (windowMs / 1000))
        const sw = (x, y) => `${((x.vol + y.vol) / 2).toFixed(2)}/${((x.invol + y.invol) / 2).toFixed(2)}`
        line.push(`${res.b}/${res.a} ${ratio.toFixed(3)} (${res.a} ${pA.us.toFixed(1)}|${qA.us.toFixed(1)} µs ${pA.n}|${qA.n} req sw ${sw(pA, qA)}, ${res.b} ${pB.us.toFixed(1)}|${qB.us.toFixed(1)} µs ${pB.n}|${qB.n} req sw ${sw(pB, qB)})`)
      }
      console.error(`round ${r + 1}: ${line.join('  ')}`)
    }

    const worked = await Promise.all(sidecars.map((call) => call({ type: 'worked' })))
    const workedCalls = worked[0].calls + worked[1].calls
    if (workedCalls > 0) console.log(`trace-work5: its loop took ${((worked[0].ns + worked[1].ns) / workedCalls / 1000).toFixed(2)} µs per request in place (mean of ${workedCalls} calls, wall time)`)
    await toLoad({ type: 'stop' })
    await Promise.all(sidecars.map((call) => call({ type: 'stop' })))
    // Let the children exit on their own (a profile given with --sidecar-flags is written at exit).
    await Promise.all(children.slice(ownFrom).map((c) => new Promise((resolve) => { c.once('exit', resolve); c.disconnect() })))
    results.forEach((res, i) => res.byProcesses.push(quantile(res.ratios.slice(from[i]), 0.5)))
  }

  console.log(`${rounds} rounds${restarts > 1 ? ` × ${restarts} fresh sets of processes` : ''}, ${windowMs} ms windows, two sidecars (${values.config} config) sharing CPU 1, c=${values.connections} each` + (Number(values.rate) > 0 ? `, ${values.rate} requests/s each (open loop)` : ' (closed loop)'))
  console.log('| B against A | A µs per request (median) | B µs per request (median) | B/A (median of rounds) | quartiles | min–max | requests/s, both sidecars |')
  console.log('|---|---:|---:|---:|---|---|---:|')
  for (const res of results) {
    const q = (p) => quantile(res.ratios, p).toFixed(3)
    console.log(`| ${res.b} / ${res.a} | ${quantile(res.usA, 0.5).toFixed(1)} | ${quantile(res.usB, 0.5).toFixed(1)} | **${q(0.5)}** | ${q(0.25)}–${q(0.75)} | ${Math.min(...res.ratios).toFixed(3)}–${Math.max(...res.ratios).toFixed(3)} | ${Math.round(quantile(res.rate, 0.5)).toLocaleString('en-US')} |`)
  }
  if (restarts > 1) for (const res of results) console.log(`${res.b} / ${res.a}, the median of each set of processes: ${res.byProcesses.map((m) => m.toFixed(3)).join(', ')}`)
  process.exit(0)
}

if (values.role === 'load') await load()
else if (values.role === 'sidecar') await sidecar()
else await parent()
