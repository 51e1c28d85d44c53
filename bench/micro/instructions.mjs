// CPU per request against the hand-written floor, counted in machine instructions instead of
// seconds: one sidecar runs under valgrind's callgrind, which counts every instruction each of
// its threads executes (V8's compiler and GC threads included), whatever else the host is doing.
// On a shared 2-core host the seconds of a request move by 2× from one moment to the next
// (paired.mjs says why); an instruction count does not. It is not the whole cost (a cache miss
// or a system call costs more than its instructions), so it sits beside the timed benches, as
// a figure a busy host cannot blur.
//
//   - one sidecar (dist/, the same config as paired.mjs), run by `valgrind --tool=callgrind
//     --instr-atstart=no`: nothing is counted until the parent turns counting on;
//   - the same process serves its port either with Breakwater or with the hand-written floor
//     (bench/proxies/node-floor.mjs), switched in-process, so both are equally warm;
//   - a load child (not under valgrind) runs the upstream (a canned answer per request head, no
//     HTTP parser) and sends exactly `--requests` requests per window, closed loop;
//   - each window: set the variant, send a warm-up batch, zero the counters, count on, send the
//     measured batch, count off, dump; instructions per request = the dump's total / requests,
//     for the main thread (where JavaScript runs) and for all threads: V8 compiles and collects
//     on helper threads at moments of its own, which makes the all-threads figure jump by 4×
//     from one window to the next.
//     Floor and sidecar alternate, the first of each round alternating too; the report is the
//     median over rounds of sidecar ÷ floor, after `--warmup` rounds that are not kept.
//
//   node bench/micro/instructions.mjs [--rounds 6] [--warmup 2] [--requests 2000] [--connections 10] [--config plain|stages]
//
// Needs valgrind (Debian package `valgrind`; `callgrind_control` comes with it). Under
// callgrind the sidecar runs 30–60× slower; a round of 2 × 2,000 requests takes about a minute.
import { fork, execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs'
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
    rounds: { type: 'string', default: '6' },
    requests: { type: 'string', default: '2000' },
    connections: { type: 'string', default: '10' },
    config: { type: 'string', default: 'plain' },
    warmup: { type: 'string', default: '2' }
  }
})

/** The upstream, and exactly `requests` requests to the sidecar's port on demand. */
async function load () {
  const upstream = rawUpstream()
  const port = await new Promise((resolve) => upstream.server.listen(0, '127.0.0.1', () => { resolve(upstream.server.address().port) }))
  const { default: autocannon } = await import('autocannon')
  serve(async (m) => {
    if (m.type === 'port') return { port }
    if (m.type === 'send') {
      const result = await autocannon({ url: `http://127.0.0.1:${m.port}/api/orders/1?page=2`, connections: m.connections, pipelining: 1, amount: m.requests, timeout: 120, headers: { 'user-agent': 'bench-client/1.0' } })
      return { ok: result['2xx'], other: result.non2xx + result.errors + result.timeouts, detail: `non2xx ${result.non2xx}, errors ${result.errors}, timeouts ${result.timeouts}, total ${result.requests.total}` }
    }
    upstream.server.close()
    return {}
  })
}

/** The sidecar, under callgrind: Breakwater or the floor on one port. */
async function sidecar () {
  const { resolveConfig } = await import('../../dist/config/load.js')
  const { startSidecar } = await import('../../dist/sidecar.js')
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-bench-'))
  const input = benchSidecarInput({ stateDir, upstream: values.upstream, collector: 'http://127.0.0.1:9/', stages: values.config === 'stages' })
  delete input.tracing
  input.limits = { maxEventLoopDelayMs: 0 } // under callgrind the loop is slow on purpose: shed nothing
  const { config } = resolveConfig(input)
  const s = await startSidecar(config, { adminToken: 'bench-token-0123456789abcdef0123' })
  const server = s.proxy.server
  const own = server.listeners('request')
  const floor = floorHandler(values.upstream)
  const serveWith = (listeners) => {
    server.removeAllListeners('request')
    for (const l of listeners) server.on('request', l)
  }
  serve(async (m) => {
    if (m.type === 'port') return { port: server.address().port }
    if (m.type === 'set') { serveWith(m.variant === 'floor' ? [floor.handler] : own); return {} }
    serveWith(own)
    await floor.close()
    await s.close()
    rmSync(stateDir, { recursive: true, force: true })
    return {}
  })
}

function callgrind (pid, ...args) {
  execFileSync('callgrind_control', [...args, String(pid)], { stdio: 'ignore' })
}

/**
 * The totals of the newest dump callgrind wrote for `pid`, one file per thread
 * (`--separate-threads`): the main thread's (`-01`, where JavaScript runs) and all threads'.
 */
function newestTotals (dir, pid, seen) {
  const files = readdirSync(dir).filter((f) => f.startsWith(`callgrind.${pid}.`) && !seen.has(f))
  if (files.length === 0) throw new Error('callgrind wrote no dump')
  let main = 0
  let all = 0
  for (const f of files) {
    seen.add(f)
    const m = /^totals: (\d+)/m.exec(readFileSync(join(dir, f), 'utf8'))
    if (m === null) throw new Error(`no total in ${f}`)
    all += Number(m[1])
    if (f.endsWith('-01')) main = Number(m[1])
  }
  return { main, all }
}

function median (xs) {
  const s = [...xs].sort((a, b) => a - b)
  const mid = s.length >> 1
  return s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2
}

async function parent () {
  const rounds = Number(values.rounds)
  const requests = Number(values.requests)
  const connections = Number(values.connections)
  const self = fileURLToPath(import.meta.url)
  const out = mkdtempSync(join(tmpdir(), 'breakwater-callgrind-'))
  const children = []
  process.on('exit', () => { for (const c of children) c.kill(); if (process.env.KEEP === undefined) rmSync(out, { recursive: true, force: true }) })
  const loader = fork(self, ['--role', 'load'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  children.push(loader)
  const toLoad = rpc(loader)
  const { port: upstreamPort } = await toLoad({ type: 'port' })
  const child = fork(self, ['--role', 'sidecar', '--upstream', `http://127.0.0.1:${upstreamPort}`, '--config', values.config], {
    execPath: 'valgrind',
    execArgv: ['--tool=callgrind', '--instr-atstart=no', '--separate-threads=yes', `--callgrind-out-file=${join(out, 'callgrind.%p')}`, process.execPath],
    stdio: ['ignore', 'ignore', 'ignore', 'ipc']
  })
  children.push(child)
  const toSidecar = rpc(child)
  const { port } = await toSidecar({ type: 'port' })
  const seen = new Set(readdirSync(out))

  const send = async (n) => {
    const r = await toLoad({ type: 'send', port, requests: n, connections })
    if (r.other > 0 || r.ok !== n) throw new Error(`a window answered ${r.ok} of ${n} with 2xx (${r.detail})`)
  }
  const window = async (variant) => {
    await toSidecar({ type: 'set', variant })
    await send(Math.max(200, requests >> 2)) // settle the variant's code paths
    callgrind(child.pid, '--zero')
    callgrind(child.pid, '--instr=on')
    await send(requests)
    callgrind(child.pid, '--instr=off')
    callgrind(child.pid, '--dump')
    const t = newestTotals(out, child.pid, seen)
    return { main: t.main / requests, all: t.all / requests }
  }

  const rows = { main: { floor: [], sidecar: [], ratio: [] }, all: { floor: [], sidecar: [], ratio: [] } }
  const n = (x) => Math.round(x).toLocaleString('en-US')
  // The first rounds warm both up and are not kept: V8 is still optimising (the floor's first
  // window counted 4–6× its later ones).
  const warmup = Number(values.warmup)
  for (let r = -warmup; r < rounds; r++) {
    const order = r % 2 === 0 ? ['floor', 'sidecar'] : ['sidecar', 'floor']
    const got = {}
    for (const v of order) got[v] = await window(v)
    const line = `floor ${n(got.floor.main)} | ${n(got.floor.all)}, sidecar ${n(got.sidecar.main)} | ${n(got.sidecar.all)} instructions per request (main thread | all threads)`
    if (r < 0) { console.error(`warm-up: ${line}`); continue }
    for (const k of ['main', 'all']) {
      rows[k].floor.push(got.floor[k])
      rows[k].sidecar.push(got.sidecar[k])
      rows[k].ratio.push(got.sidecar[k] / got.floor[k])
    }
    console.error(`round ${r + 1}: ${line}, ratio ${(got.sidecar.main / got.floor.main).toFixed(3)} | ${(got.sidecar.all / got.floor.all).toFixed(3)}`)
  }
  await toSidecar({ type: 'stop' })
  await toLoad({ type: 'stop' })
  // callgrind writes a last dump as the sidecar exits: wait for it before the folder goes.
  await new Promise((resolve) => { child.once('exit', resolve); child.disconnect() })
  console.log(`${rounds} rounds × ${requests.toLocaleString('en-US')} requests per variant, c=${connections}, ${values.config} config, one sidecar under callgrind`)
  console.log('| instructions per request, median of rounds | floor | sidecar | sidecar ÷ floor | ratios by round |')
  console.log('|---|---:|---:|---:|---|')
  for (const [k, label] of [['main', 'main thread (JavaScript, and what it waits on)'], ['all', 'all threads (V8\'s compiler and GC helpers too)']]) {
    const row = rows[k]
    console.log(`| ${label} | ${n(median(row.floor))} | ${n(median(row.sidecar))} | **${median(row.ratio).toFixed(3)}** | ${row.ratio.map((x) => x.toFixed(3)).join(', ')} |`)
  }
  process.exit(0)
}

if (values.role === 'load') await load()
else if (values.role === 'sidecar') await sidecar()
else await parent()
