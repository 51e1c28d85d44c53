import t from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { Client, Pool } from 'undici'
import { parse, stringify } from 'yaml'
import type { Test } from 'tap'
import { startUpstream, echo, delay, refusedUrl } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { startProcessRaw, rssBytes, imageNodeFlags, type RawRunning } from './helpers/process.js'
import { send, getJson, eventually, sleep } from './helpers/http.js'
import { metricValue } from './helpers/metrics.js'

type Line = Record<string, unknown>

const isAccess = (l: Line): boolean => l.msg === 'request'

/** Send `count` GET requests to `path` over a few keep-alive connections. */
async function drive (base: string, count: number, path: string | ((i: number) => string) | { path: string, headers: Record<string, string> }, connections = 4): Promise<number[]> {
  const pool = new Pool(base, { connections })
  const statuses: number[] = []
  let next = 0
  const worker = async (): Promise<void> => {
    while (next < count) {
      const i = next++
      const res = await pool.request(typeof path === 'object' ? { ...path, method: 'GET' } : { path: typeof path === 'string' ? path : path(i), method: 'GET' })
      await res.body.dump()
      statuses.push(res.statusCode)
    }
  }
  try {
    await Promise.all(Array.from({ length: connections }, worker))
  } finally {
    await pool.close()
  }
  return statuses
}

/** Every non-empty line of `text` is one JSON object; returns them parsed. */
function jsonLines (t: Test, text: string): Line[] {
  const out: Line[] = []
  let bad = 0
  for (const line of text.split('\n')) {
    if (line === '') continue
    let value: unknown
    try { value = JSON.parse(line) } catch { value = undefined }
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      bad++
      if (bad <= 3) t.fail('a stdout line that is not a JSON object', { line: line.slice(0, 300) })
      continue
    }
    out.push(value as Line)
  }
  t.equal(bad, 0, 'every stdout line is a JSON object')
  return out
}

t.test('one access-log line per proxied request, with the request\'s essentials', async (t) => {
  const up = await startUpstream(delay(150))
  t.teardown(up.close)
  const { proxy, logs } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'orders', match: { pathPrefix: '/orders' }, upstream: 'app' }]
  })
  const res = await send(proxy, '/orders/7?card=4111111111111111&token=secret', { method: 'POST', body: 'x', headers: { 'x-request-id': 'req-42' } })
  t.equal(res.status, 200, 'proxied')
  t.ok(await eventually(() => logs.some((l) => isAccess(l) && l.requestId === 'req-42')), 'the access line is written')
  const lines = logs.filter((l) => isAccess(l) && l.requestId === 'req-42')
  t.equal(lines.length, 1, 'exactly one line for the request')
  const line = lines[0] as Line
  t.equal(line.level, 'info', 'level')
  t.equal(line['http.request.method'], 'POST', 'http.request.method')
  t.equal(line['url.path'], '/orders/7', 'url.path: the path, without its query string')
  t.equal(line['http.route'], '/orders*', 'http.route: the route\'s template')
  t.equal(line['client.address'], '127.0.0.1', 'client.address')
  t.equal(line['server.address'], '127.0.0.1', 'server.address: the Host header\'s host')
  t.equal(line.route, 'orders', 'route name')
  t.equal(line.upstream, 'app', 'upstream name')
  t.equal(line['http.response.status_code'], 200, 'http.response.status_code')
  t.type(line.durationMs, 'number', 'durationMs')
  t.ok((line.durationMs as number) >= 100, `durationMs covers the upstream's time (${String(line.durationMs)})`)
  t.notOk('error.type' in line, 'no error.type on a success')
  t.notOk('method' in line || 'path' in line || 'status' in line || 'error' in line, 'the pre-OpenTelemetry names are gone')
  t.notMatch(JSON.stringify(line), /4111|secret/, 'nothing from the query string is logged')

  const count = 40
  const statuses = await drive(proxy, count, (i) => `/orders/${i}?q=${i}`)
  t.same(statuses, Array(count).fill(200), `${count} more requests served`)
  t.ok(await eventually(() => logs.filter(isAccess).length >= count + 1), 'lines for every request')
  await sleep(50)
  const access = logs.filter(isAccess)
  t.equal(access.length, count + 1, 'one line per request, no more')
  t.equal(new Set(access.map((l) => l.requestId)).size, count + 1, 'each with its own request id')
})

t.test('locally generated errors get an access-log line with `error.type`, 5xx at warn', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const down = await refusedUrl()
  const { proxy, logs } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url }, gone: { url: down } },
    routes: [
      { name: 'api', match: { pathPrefix: '/api' }, upstream: 'app' },
      { name: 'legacy', match: { pathPrefix: '/legacy' }, upstream: 'gone' }
    ]
  })
  const missing = await send(proxy, '/nowhere/else?x=1', { headers: { 'x-request-id': 'r-404' } })
  t.equal(missing.status, 404, 'no route: 404')
  const unavailable = await send(proxy, '/legacy/page', { headers: { 'x-request-id': 'r-502' } })
  t.equal(unavailable.status, 502, 'connection refused: 502')
  t.ok(await eventually(() => logs.filter(isAccess).length >= 2), 'both are logged')

  const noRoute = logs.find((l) => isAccess(l) && l.requestId === 'r-404')
  t.equal(noRoute?.['http.response.status_code'], 404, '404 line: status')
  t.equal(noRoute?.['error.type'], 'no_route', '404 line: error.type')
  t.equal(noRoute?.['url.path'], '/nowhere/else', '404 line: path without query')
  t.equal(noRoute?.['http.request.method'], 'GET', '404 line: method')
  t.equal(noRoute?.level, 'info', '404 line: a 4xx is info')
  t.type(noRoute?.durationMs, 'number', '404 line: durationMs')

  const refused = logs.find((l) => isAccess(l) && l.requestId === 'r-502')
  t.equal(refused?.['http.response.status_code'], 502, '502 line: status')
  t.equal(refused?.['error.type'], 'upstream_unavailable', '502 line: error.type')
  t.equal(refused?.level, 'warn', '502 line: a 5xx is a warning')
  t.equal(refused?.route, 'legacy', '502 line: route')
  t.equal(refused?.upstream, 'gone', '502 line: upstream')
  t.equal(logs.filter(isAccess).length, 2, 'one line each')
})

t.test('logging.accessLog: false writes no request lines', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxy, logs } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/app' }, upstream: 'app' }],
    logging: { accessLog: false }
  })
  const statuses = await drive(proxy, 30, (i) => (i % 3 === 0 ? '/missing' : '/app'))
  t.equal(statuses.filter((s) => s === 200).length, 20, 'proxied')
  t.equal(statuses.filter((s) => s === 404).length, 10, 'no route')
  await sleep(100)
  t.equal(logs.filter(isAccess).length, 0, 'no access lines, for proxied or local responses')
  t.ok(logs.some((l) => l.msg === 'listening'), 'other log lines are still written')
})

t.test('logging.accessLog: 0.5 samples about half of the requests', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const { proxy, logs } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    logging: { accessLog: 0.5 }
  })
  const total = 400
  const statuses = await drive(proxy, total, '/sampled')
  t.equal(statuses.filter((s) => s === 200).length, total, 'every request is served whether logged or not')
  await sleep(100)
  const logged = logs.filter(isAccess).length
  // Binomial(400, 0.5): mean 200, sd 10; 120..280 is eight standard deviations either way.
  t.ok(logged >= 120 && logged <= 280, `${logged} of ${total} requests logged`)
})

/** Rewrite a running process's config file through `change`. */
function rewriteConfig (path: string, change: (config: Record<string, any>) => void): void {
  const config = parse(readFileSync(path, 'utf8')) as Record<string, any>
  change(config)
  writeFileSync(path, stringify(config))
}

t.test('every line a spawned process writes to stdout is one JSON object', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const down = await refusedUrl()
  const bw = await startProcessRaw(t, {
    upstreams: { app: { url: up.url }, gone: { url: down } },
    routes: [
      { name: 'api', match: { pathPrefix: '/api' }, upstream: 'app' },
      { name: 'legacy', match: { pathPrefix: '/legacy' }, upstream: 'gone' }
    ],
    health: { failOnOpenCircuit: 'any' }, // a config warning at start
    logging: { level: 'debug' },
    shutdown: { drainDelayMs: 0, timeoutMs: 2000 }
  })
  t.equal((await send(bw.proxy, '/api/a?b=c', { headers: { authorization: 'Bearer s3cret', cookie: 'session=s3cret' } })).status, 200, 'proxied')
  t.equal((await send(bw.proxy, '/nope')).status, 404, 'no route')
  t.equal((await send(bw.proxy, '/legacy')).status, 502, 'upstream refused')
  t.equal((await send(bw.proxy, '/api/%zz')).status, 400, 'bad encoding')
  t.equal((await getJson(`${bw.ops}/metrics`)).status, 200, 'metrics scraped')
  rewriteConfig(bw.configPath, (c) => { c.routes[0].upstream = 'ghost' })
  bw.child.kill('SIGHUP')
  t.ok(await eventually(() => bw.stdout().includes('"result":"refused"'), 10000), 'the refused reload is logged')
  bw.child.kill('SIGTERM')
  t.equal(await bw.exited, 0, 'exit 0')

  const lines = jsonLines(t, bw.stdout())
  t.ok(lines.length >= 8, `${lines.length} lines`)
  const incomplete = lines.filter((l) => typeof l.level !== 'string' || typeof l.time !== 'string' || typeof l.msg !== 'string')
  t.same(incomplete, [], 'every line has a level, a time and a msg')
  for (const key of ['listening', 'request', 'config reload refused; the running config is kept', 'stopped']) {
    t.ok(lines.some((l) => l.msg === key || (key === 'request' && isAccess(l))), `includes "${key}"`)
  }
  t.notMatch(bw.stdout(), /s3cret/, 'credentials never reach the log')
})

/** A spawned sidecar that logs every request, with one catch-all route to `url`. */
async function startLogging (t: Test, url: string, options: { stopReadingStdout?: boolean, discardStdout?: boolean, nodeFlags?: string[] } = {}): Promise<RawRunning> {
  return await startProcessRaw(t, {
    upstreams: { app: { url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    logging: { accessLog: true },
    shutdown: { drainDelayMs: 0, timeoutMs: 2000 }
  }, options)
}

t.test('every request\'s line reaches stdout, in request order, in its place among other lines', async (t) => {
  const up = await startUpstream((_req, res) => { res.end('ok') })
  t.teardown(up.close)
  const bw = await startLogging(t, up.url)
  // One keep-alive connection, one request at a time: the order of the lines is the order
  // of the requests. A reload in the middle writes a pino line between the two halves.
  const client = new Client(bw.proxy, { pipelining: 1 })
  t.teardown(async () => { await client.close() })
  const count = 3000
  const run = async (from: number, to: number): Promise<void> => {
    for (let i = from; i < to; i++) {
      const res = await client.request({ path: `/item/${i}`, method: 'GET', headers: { 'x-request-id': `seq-${i}` } })
      await res.body.dump()
    }
  }
  await run(0, count / 2)
  bw.child.kill('SIGHUP')
  t.ok(await eventually(() => bw.stdout().includes('"msg":"config reloaded"'), 10000), 'the reload is logged')
  await run(count / 2, count)
  t.equal(await metricValue(bw.ops, 'breakwater_log_lines_dropped_total'), 0, 'nothing dropped')
  bw.child.kill('SIGTERM')
  t.equal(await bw.exited, 0, 'exit 0')

  const lines = bw.stdout().split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Line)
  const ids = lines.filter(isAccess).map((l) => l.requestId)
  t.equal(ids.length, count, `${count} access lines`)
  const outOfOrder = ids.findIndex((id, i) => id !== `seq-${i}`)
  t.equal(outOfOrder, -1, 'in request order')
  const reloaded = lines.findIndex((l) => l.msg === 'config reloaded')
  t.equal(lines[reloaded - 1]?.requestId, `seq-${count / 2 - 1}`, 'the reload line comes after the first half')
  t.equal(lines.slice(reloaded + 1).find(isAccess)?.requestId, `seq-${count / 2}`, 'and before the second')
})

t.test('a line logged while a request is answered comes after the access lines of the requests before it', async (t) => {
  // Access lines are made in batches (lines.ts `later`); an event logged in between (here the
  // circuit opening, logged while the request that opened it is answered) must not overtake them.
  const up = await startUpstream((_req, res) => { res.statusCode = 500; res.end('broken') })
  t.teardown(up.close)
  const bw = await startProcessRaw(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    circuitBreakers: { app: { failureThreshold: 0.5, volumeThreshold: 5 } },
    logging: { accessLog: true },
    shutdown: { drainDelayMs: 0, timeoutMs: 2000 }
  })
  const client = new Client(bw.proxy, { pipelining: 1 })
  t.teardown(async () => { await client.close() })
  for (let i = 0; i < 12; i++) {
    const res = await client.request({ path: `/item/${i}`, method: 'GET', headers: { 'x-request-id': `seq-${i}` } })
    await res.body.dump()
  }
  bw.child.kill('SIGTERM')
  t.equal(await bw.exited, 0, 'exit 0')

  const lines = bw.stdout().split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Line)
  const opened = lines.findIndex((l) => l.event === 'circuit_open')
  t.ok(opened !== -1, 'the circuit opened')
  const before = lines.slice(0, opened).filter(isAccess).map((l) => l.requestId)
  t.ok(before.length >= 1, `${before.length} access lines before it`)
  t.same(before, before.map((_, i) => `seq-${i}`), 'the requests before it, in order')
  t.equal(lines.slice(opened + 1).find(isAccess)?.requestId, `seq-${before.length}`, 'the request that opened it, right after')
  t.equal(lines.filter(isAccess).length, 12, 'every request has its line')
})

/** Lines of about 8 KB each: the path alone (the access line carries it). */
const LONG_PATH = `/${'a'.repeat(8000)}`
/** With it, lines of about 15 KB. */
const LONG_AGENT = { path: LONG_PATH, headers: { 'user-agent': 'u'.repeat(7000) } }

/**
 * How much `bw`'s resident memory grows while it serves 4,000 requests whose access lines are
 * about 15 KB each (60 MB of lines).
 */
async function rssGrowthOver4000 (t: Test, bw: RawRunning): Promise<{ before: number, growth: number }> {
  const pid = bw.child.pid as number
  const before = rssBytes(pid)
  const statuses = await drive(bw.proxy, 4000, LONG_AGENT, 1)
  t.equal(statuses.filter((s) => s === 200).length, 4000, '4000 more served')
  return { before, growth: rssBytes(pid) - before }
}

t.test('a stalled stdout drops log lines (counted) instead of stalling the proxy or growing memory', async (t) => {
  const up = await startUpstream((_req, res) => { res.end('ok') })
  t.teardown(up.close)
  const mib = (n: number): string => (n / 1048576).toFixed(1)

  // The control: the same traffic with stdout read as fast as it comes (and thrown away). How
  // far the heap grows before a full collection is V8's choice: this traffic's garbage alone
  // grows RSS by about 30 MiB on Node 24 and 2 MiB on Node 20. So the stalled sidecar is
  // measured against the control, not against a fixed figure. Both run with the image's Node
  // flags, as they ship: with Node 24's own sizing the young generation alone may reach 128 MiB,
  // and the two processes' RSS then differed by 62 MiB with every line dropped.
  const nodeFlags = imageNodeFlags()
  const control = await startLogging(t, up.url, { discardStdout: true, nodeFlags })
  await drive(control.proxy, 2000, LONG_PATH, 8)
  const read = await rssGrowthOver4000(t, control)
  control.child.kill('SIGTERM')
  t.equal(await control.exited, 0, 'the control exits 0')

  const bw = await startLogging(t, up.url, { stopReadingStdout: true, nodeFlags })

  // Nobody reads the process's stdout from here on. Long paths make every access line about
  // 8 KB, so a few thousand requests write far more than the log buffer (4 MiB) and the pipe hold.
  const started = Date.now()
  const statuses = await drive(bw.proxy, 2000, LONG_PATH, 8)
  t.equal(statuses.filter((s) => s === 200).length, 2000, `2000 requests served in ${Date.now() - started} ms with stdout stalled`)

  const dropped = await metricValue(bw.ops, 'breakwater_log_lines_dropped_total')
  t.ok(dropped > 0, `breakwater_log_lines_dropped_total is ${dropped}`)

  // With the buffer full, 4,000 more lines of about 15 KB: 60 MB nobody reads. Kept, they would
  // show as at least 57 MiB more than the control grew.
  const stalled = await rssGrowthOver4000(t, bw)
  // The last lines are handed over (and dropped) when their batch leaves, up to 50 ms after
  // their requests: on a fast run a hundred of them.
  let droppedMore = 0
  await eventually(async () => {
    droppedMore = await metricValue(bw.ops, 'breakwater_log_lines_dropped_total') - dropped
    return droppedMore >= 3900
  })
  t.ok(droppedMore >= 3900, `nearly every one of them dropped and counted (${droppedMore} of 4000)`)
  t.ok(stalled.growth - read.growth < 32 * 1048576,
    `RSS grew ${mib(stalled.growth)} MiB (from ${mib(stalled.before)}) while 60 MB of lines went unread; ${mib(read.growth)} MiB (from ${mib(read.before)}) with them read`)

  const res = await send(bw.proxy, '/still-there')
  const live = await getJson(`${bw.ops}/live`)
  t.equal(res.status, 200, 'the proxy still answers')
  t.equal(live.status, 200, '/live still answers')

  // Read again: what was kept comes out as whole JSON lines (drops never cut a line).
  const stdout = bw.child.stdout as NonNullable<typeof bw.child.stdout>
  let rest = ''
  stdout.on('data', (c: Buffer) => { rest += c.toString('utf8') })
  stdout.resume()
  bw.child.kill('SIGTERM')
  t.equal(await bw.exited, 0, 'exits 0')
  await new Promise<void>((resolve) => { if (stdout.readableEnded) resolve(); else stdout.once('end', () => resolve()) })
  const lines = jsonLines(t, bw.stdout() + rest)
  const accessLines = lines.filter(isAccess).length
  t.ok(accessLines > 0 && accessLines < 6001, `${accessLines} access lines kept of 6001`)
})
