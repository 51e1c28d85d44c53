// What a sampled request costs the whole sidecar, export included, measured inside one real
// sidecar under load so that a noisy host touches every variant alike.
//
// This process runs a sidecar (dist/, tracing at sampleRatio 1) pinned to CPU 1; a child on
// CPU 0 runs the upstream (a node:http server answering "ok\n" on every path, also the
// collector) and autocannon (c=50) through the sidecar. The parent switches the data plane's
// exporter every window, in rotated order each round:
//
//   - `off`: no exporter: the sidecar is not a hop of the trace (as `breakwater`, no tracing);
//   - `encode`: spans encoded into batches by the real queue and encoder, the batch thrown
//     away instead of sent (what the request path and the encoding cost, garbage included);
//   - `export`: the sidecar's own exporter, OTLP/HTTP to the collector (as `breakwater-trace100`);
//   - `sample1`: the same exporter with 1 % of new traces sampled (as `breakwater-trace1`).
//
// and reads, per window, the requests the upstream answered and the CPU time of the sidecar's
// main thread and of all its threads (/proc/self/task/*/schedstat: run time, steal excluded).
// The report is µs per request per variant (medians over rounds) and the median of per-round
// differences to `off`: the cost of a sampled request's span, split into main thread and the
// rest (V8's helper threads: garbage collection, mostly).
//
//   node bench/micro/trace-path.mjs [--rounds 15] [--window 1500] [--settle 300] [--variants off,encode,export,sample1]
import { fork, execFileSync } from 'node:child_process'
import { readdirSync, readFileSync, mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { parseArgs } from 'node:util'
import { fileURLToPath } from 'node:url'
import { benchSidecarInput } from './sidecar-config.mjs'

const { values } = parseArgs({
  options: {
    child: { type: 'boolean', default: false },
    rounds: { type: 'string', default: '15' },
    window: { type: 'string', default: '1500' },
    settle: { type: 'string', default: '300' },
    variants: { type: 'string', default: 'off,encode,export' },
    connections: { type: 'string', default: '50' }
  }
})

/** CPU 0: upstream + collector, and the load through the sidecar once told its port. */
async function child () {
  let requests = 0
  let spansBytes = 0
  const server = createServer((req, res) => {
    if (req.method === 'POST') {
      req.on('data', (chunk) => { spansBytes += chunk.length })
      req.on('end', () => { res.end('ok\n') })
      return
    }
    requests++
    res.end('ok\n')
  })
  server.keepAliveTimeout = 120_000
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { default: autocannon } = await import('autocannon')
  let load = null
  process.on('message', (m) => {
    if (m.type === 'count') process.send({ type: 'count', requests, spansBytes })
    else if (m.type === 'load') load = autocannon({ url: `http://127.0.0.1:${m.port}/api/orders/1?page=2`, connections: m.connections, pipelining: 1, duration: 100_000, headers: { 'user-agent': 'bench-client/1.0' } })
    else if (m.type === 'stop') { load?.stop(); server.close(); server.closeAllConnections(); process.disconnect() }
  })
  process.on('disconnect', () => { process.exit(0) }) // the sidecar's side ended, however it ended
  process.send({ type: 'port', port: server.address().port })
}

function schedstat (path) {
  return Number(readFileSync(path, 'utf8').split(' ')[0])
}

/** Nanoseconds run by the main thread and by every thread of this process. */
function cpuNs () {
  const main = schedstat(`/proc/self/task/${process.pid}/schedstat`)
  let total = 0
  for (const tid of readdirSync('/proc/self/task')) {
    try { total += schedstat(`/proc/self/task/${tid}/schedstat`) } catch {} // a thread that just ended
  }
  return { main, total }
}

function median (xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function parent () {
  const rounds = Number(values.rounds)
  const windowMs = Number(values.window)
  const settleMs = Number(values.settle)
  const variants = values.variants.split(',')
  try { execFileSync('taskset', ['-a', '-p', '-c', '1', String(process.pid)], { stdio: 'ignore' }) } catch { console.error('taskset failed: not pinned') }
  const load = fork(fileURLToPath(import.meta.url), ['--child'], { execArgv: [], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  process.on('exit', () => { load.kill() })
  try { execFileSync('taskset', ['-a', '-p', '-c', '0', String(load.pid)], { stdio: 'ignore' }) } catch {}
  const replies = []
  load.on('message', (m) => { replies.shift()?.(m) })
  const ask = (m) => new Promise((resolve) => { replies.push(resolve); if (m !== null) load.send(m) })
  const { port: upstreamPort } = await ask(null)

  const { resolveConfig } = await import('../../dist/config/load.js')
  const { startSidecar } = await import('../../dist/sidecar.js')
  const { SpanQueue, ProtobufEncoding } = await import('../../dist/ops/tracing.js')
  const { SpanEncoder } = await import('../../dist/ops/otlp-protobuf.js')
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-bench-'))
  const upstream = `http://127.0.0.1:${upstreamPort}`
  const { config } = resolveConfig(benchSidecarInput({ stateDir, upstream, collector: upstream }))
  const quiet = new Writable({ write (_chunk, _enc, cb) { cb() } })
  const sidecar = await startSidecar(config, { logDestination: quiet, adminToken: 'bench-token-0123456789abcdef0123' })
  const tracing = sidecar.tracing // the data plane's view: { exporter }
  const exporting = tracing.exporter
  const thrownAway = { export: (_batch, done) => { done({ code: 0 }) }, shutdown: async () => {} }
  const encoding = new ProtobufEncoding(new SpanEncoder({ 'service.name': 'bench', 'service.version': 'bench' }, { name: 'breakwater', version: '0.1.0' }), thrownAway, config.tracing.batch.maxSize)
  const encodeOnly = new SpanQueue(config.tracing, encoding, { exported: 0, dropped: { queue_full: 0, export_failed: 0 } }, sidecar.logger)
  // `sample1`: the real exporter with 1 % of new traces sampled (as `breakwater-trace1`): every
  // request gets ids and a `traceparent`, one in a hundred a span.
  const sampledOne = { sampleRatio: 0.01, add: (ctx) => { exporting.add(ctx) } }
  const exporters = { off: null, encode: encodeOnly, export: exporting, sample1: sampledOne }
  const proxyPort = sidecar.proxy.server.address().port

  load.send({ type: 'load', port: proxyPort, connections: Number(values.connections) })
  tracing.exporter = exporting
  await sleep(3000) // warm up: JIT, connections, the heap's size
  const samples = Object.fromEntries(variants.map((v) => [v, []]))
  for (let r = 0; r < rounds; r++) {
    const order = variants.map((_, i) => variants[(i + r) % variants.length])
    const round = {}
    for (const v of order) {
      tracing.exporter = exporters[v]
      await sleep(settleMs)
      const c0 = await ask({ type: 'count' })
      const t0 = cpuNs()
      await sleep(windowMs)
      const t1 = cpuNs()
      const c1 = await ask({ type: 'count' })
      const n = c1.requests - c0.requests
      round[v] = { n, main: (t1.main - t0.main) / 1000 / n, total: (t1.total - t0.total) / 1000 / n }
      samples[v].push(round[v])
    }
    console.error(`round ${r + 1}: ` + variants.map((v) => `${v} ${round[v].main.toFixed(1)}/${round[v].total.toFixed(1)} µs (${round[v].n})`).join('  '))
    if (round.off !== undefined) {
      for (const v of variants) if (v !== 'off') (samples[`${v}−off`] ??= []).push({ main: round[v].main - round.off.main, total: round[v].total - round.off.total, ratio: round[v].total / round.off.total })
    }
  }
  tracing.exporter = null
  load.send({ type: 'stop' })
  await sidecar.close()
  rmSync(stateDir, { recursive: true, force: true })

  console.log(`| variant | main thread µs per request | all threads µs per request | other threads | ratio to off (median of rounds, min–max) | requests/s |`)
  console.log('|---|---:|---:|---:|---:|---:|')
  for (const [name, s] of Object.entries(samples)) {
    const main = median(s.map((x) => x.main))
    const total = median(s.map((x) => x.total))
    const ratio = s[0].ratio === undefined ? '' : `${median(s.map((x) => x.ratio)).toFixed(3)} (${Math.min(...s.map((x) => x.ratio)).toFixed(2)}–${Math.max(...s.map((x) => x.ratio)).toFixed(2)})`
    const rate = s[0].n === undefined ? '' : Math.round(median(s.map((x) => x.n)) / (windowMs / 1000)).toLocaleString('en-US')
    console.log(`| ${name} | ${main.toFixed(2)} | ${total.toFixed(2)} | ${(total - main).toFixed(2)} | ${ratio} | ${rate} |`)
  }
}

if (values.child) await child()
else await parent()
