/**
 * The one outcome model (SPEC §15): every request ends `ok`, `upstream`, `client` or
 * `breakwater`, and only `upstream` causes count as failures for breakers, passive ejection and
 * trigger windows. A client that leaves is neither a success nor a failure; a request undici
 * cannot send because of the request itself is a 400 before any upstream contact; metrics say
 * who produced each status; WebSocket handshakes run the same stages as every request.
 */
import t, { type Test } from 'tap'
import { startUpstream, hang, refusedUrl, type TestUpstream } from './helpers/upstream.js'
import { startTestSidecar, type TestSidecar } from './helpers/sidecar.js'
import { send, raw, eventually } from './helpers/http.js'
import { WireClient, parseResponse } from './helpers/wire.js'
import { scrape, sumOf } from './helpers/metrics.js'
import { admin } from './helpers/admin.js'
import { emptySums } from '../src/proxy/window.js'
import { startWebSocketUpstream, handshakeRequest } from './helpers/websocket.js'

const KEY = 'dGhlIHNhbXBsZSBub25jZQ=='

/** A request undici refuses to send as it is (it would otherwise reach the upstream). */
const DUPLICATE_HOST = 'GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n'

function accessLines (s: TestSidecar): Array<Record<string, unknown>> {
  return s.logs.filter((l) => l.msg === 'request')
}

function circuitOf (s: TestSidecar, upstream: string): any {
  return s.sidecar.dataPlane.circuit(upstream)
}

async function triggerOf (s: TestSidecar, name: string): Promise<any> {
  s.sidecar.triggers.evaluate()
  const state = await admin(s.admin, 'GET', '/v1/state')
  return (state.body.triggers as any[]).find((x) => x.name === name)
}

/** `n` clients send `GET path` and give up once the upstream holds all their requests. */
async function impatient (t: Test, s: TestSidecar, up: TestUpstream, path: string, n: number): Promise<void> {
  const before = up.received.length
  const abortedBefore = up.aborted
  const clients = await Promise.all(Array.from({ length: n }, async () => await WireClient.connect(s.proxyPort)))
  for (const c of clients) c.write(`GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`)
  t.ok(await eventually(() => up.received.length === before + n, 10_000), `the upstream holds the ${n} requests`)
  for (const c of clients) c.destroy()
  t.ok(await eventually(() => up.aborted === abortedBefore + n, 10_000), `the ${n} aborts reached the upstream`)
}

/** A sidecar whose circuit to `up` (answering 500 for now) two failures opened, once it is half-open. */
async function halfOpen (t: Test, up: TestUpstream): Promise<TestSidecar> {
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { pay: { url: up.url } },
    routes: [{ name: 'pay', match: { pathPrefix: '/' }, upstream: 'pay' }],
    circuitBreakers: { pay: { volumeThreshold: 2, recoveryTimeout: 200 } }
  })
  t.same([(await send(s.proxy, '/')).status, (await send(s.proxy, '/')).status], [500, 500])
  t.equal(circuitOf(s, 'pay').state, 'open')
  t.ok(await eventually(() => circuitOf(s, 'pay').state === 'half-open', 5000), 'half-open after recoveryTimeout')
  return s
}

/** A sidecar with one route to an echoing upstream, and a client connected to it (both closed in teardown). */
async function uploader (t: Test): Promise<{ s: TestSidecar, client: WireClient }> {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, { upstreams: { app: { url: up.url } }, routes: [{ name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }] })
  const client = await WireClient.connect(s.proxyPort)
  t.teardown(() => client.destroy())
  return { s, client }
}

t.test('impatient clients of a hanging upstream: their aborts are not successes, and the timeouts still open the circuit', async (t) => {
  const up = await startUpstream(hang)
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { pay: { url: up.url } },
    // Long enough for the 12 clients to leave first on a busy machine: the sweep times a head
    // out at its due time, and one that fired before a client left would be a real timeout.
    routes: [{ name: 'pay', match: { pathPrefix: '/' }, upstream: 'pay', timeoutMs: 2000 }],
    circuitBreakers: { pay: { volumeThreshold: 4, failureThreshold: 0.5, recoveryTimeout: 60_000 } }
  })
  await impatient(t, s, up, '/pay', 12)
  t.equal(circuitOf(s, 'pay').state, 'closed')
  t.equal(circuitOf(s, 'pay').windowRequests, 0, 'no abort entered the breaker\'s window (none dilutes it)')
  const patient = await Promise.all(Array.from({ length: 4 }, async () => await send(s.proxy, '/pay')))
  t.same(patient.map((r) => r.status), [504, 504, 504, 504], 'four patient clients see the timeouts')
  t.equal(circuitOf(s, 'pay').state, 'open', '4 timeouts of 4 counted requests open it; 12 aborts did not dilute them to 25 %')
  const refused = await send(s.proxy, '/pay')
  t.equal(refused.headers['x-breakwater-error'], 'circuit_open')
  const lines = accessLines(s)
  t.equal(lines.filter((l) => l.outcome === 'client').length, 12, 'the aborts are logged with outcome client')
  t.ok(lines.filter((l) => l.outcome === 'client').every((l) => l['http.response.status_code'] === 499), '... and status 499')
  t.equal(lines.filter((l) => l.outcome === 'upstream').length, 4, 'the timeouts with outcome upstream')
})

t.test('clients that give up on a body the upstream stalls after a good head are not successes: outcome client, the status they got stands', async (t) => {
  const up = await startUpstream((_req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '1000' })
    res.write('partial') // then nothing
  })
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { pay: { url: up.url } },
    routes: [{ name: 'pay', match: { pathPrefix: '/' }, upstream: 'pay' }],
    circuitBreakers: { pay: { volumeThreshold: 4, recoveryTimeout: 60_000 } }
  })
  const clients = await Promise.all(Array.from({ length: 6 }, async () => await WireClient.connect(s.proxyPort)))
  for (const c of clients) c.write('GET /stalled HTTP/1.1\r\nHost: x\r\n\r\n')
  for (const c of clients) await c.until((w) => w.received.includes('partial'), 10_000, 'the head and the first bytes')
  for (const c of clients) c.destroy()
  t.ok(await eventually(() => up.aborted === 6, 10_000), 'the aborts reached the upstream')
  t.ok(await eventually(() => accessLines(s).length === 6, 10_000), 'six access-log lines')
  t.same(accessLines(s).map((l) => [l['http.response.status_code'], l.outcome]), Array(6).fill([200, 'client']), 'the status each got, and the client\'s leaving as the cause')
  t.equal(circuitOf(s, 'pay').windowRequests, 0, 'none entered the breaker\'s window as a success')
  const requests = await scrape(s.ops)
  t.equal(sumOf(requests, 'breakwater_requests_total', { code: '200', source: 'upstream' }), 6, 'the metrics count the 200s the upstream sent')
})

t.test('a half-open probe whose client gives up does not close the circuit: the next request is the new probe', async (t) => {
  let mode: 'fail' | 'hang' | 'held' = 'fail'
  // In `held` mode an answer waits here until the test lets it go.
  const held: Array<() => void> = []
  const up = await startUpstream((_req, res) => {
    if (mode === 'hang') return
    if (mode === 'fail') { res.writeHead(500); res.end('no'); return }
    held.push(() => { if (!res.destroyed) { res.writeHead(200); res.end('ok') } })
  })
  const s = await halfOpen(t, up)

  mode = 'hang'
  await impatient(t, s, up, '/probe', 1)
  t.equal(circuitOf(s, 'pay').state, 'half-open', 'the abandoned probe neither closed nor re-opened the circuit')
  t.notOk(s.logs.some((l) => l.event === 'circuit_closed'), 'no close was logged')

  mode = 'held'
  const before = up.received.length
  const probe = send(s.proxy, '/again')
  t.ok(await eventually(() => up.received.length === before + 1 && held.length === 1), 'the next request went through as the new probe')
  const during = await send(s.proxy, '/meanwhile')
  t.equal(during.status, 503, 'while it is in flight, others are refused: it is the one probe')
  t.equal(during.headers['x-breakwater-error'], 'circuit_open')
  for (const answer of held) answer()
  t.equal((await probe).status, 200)
  t.equal(circuitOf(s, 'pay').state, 'closed', 'a good probe closes it')
})

t.test('a response the upstream cuts short or stalls after a good head is its failure for the breaker and the ejection too', async (t) => {
  const upstream = async (): Promise<TestUpstream> => {
    const up = await startUpstream((req, res) => {
      if (req.url === '/ok') { res.writeHead(200); res.end('ok'); return }
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '1000' })
      res.write('partial')
      // `/cut` drops the connection; `/stall` sends nothing more.
      if (req.url === '/cut') setTimeout(() => res.socket?.destroy(), 20)
    })
    t.teardown(up.close)
    return up
  }
  const request = (path: string): string => `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`

  for (const path of ['/cut', '/stall']) {
    t.test(`${path}: four of them open the circuit`, async (t) => {
      const up = await upstream()
      const s = await startTestSidecar(t, {
        upstreams: { pay: { url: up.url } },
        routes: [{ name: 'pay', match: { pathPrefix: '/' }, upstream: 'pay', idleTimeoutMs: 400 }],
        circuitBreakers: { pay: { volumeThreshold: 4, failureThreshold: 0.5, recoveryTimeout: 60_000 } }
      })
      for (let i = 0; i < 4; i++) {
        const answer = await raw(s.proxyPort, request(path), 10_000)
        t.match(answer, /^HTTP\/1\.1 200 [^]*partial$/, 'the client got the head and the part that came, then the connection closed')
      }
      t.equal(circuitOf(s, 'pay').state, 'open', 'four failures of four counted requests open it')
      const lines = accessLines(s)
      t.same(lines.map((l) => [l.outcome, l['error.type'], l.level]), Array(4).fill(['upstream', path === '/cut' ? 'upstream_reset' : 'upstream_timeout', 'warn']), 'logged as the upstream\'s failure, at warn')
      t.equal(s.sidecar.dataPlane.stats.clientErrors.get('slow_client') ?? 0, 0, 'no client was blamed for the upstream\'s silence')
      // Counted under the status their head carried, and as cut, so a dashboard or an alert
      // over the metrics sees the failure the access log shows.
      const samples = await scrape(s.ops)
      t.equal(sumOf(samples, 'breakwater_requests_total', { route: 'pay', code: '200', source: 'upstream' }), 4, 'in breakwater_requests_total as the 200 their head said')
      t.equal(sumOf(samples, 'breakwater_responses_cut_total', { route: 'pay', upstream: 'pay', code: '200', error: path === '/cut' ? 'upstream_reset' : 'upstream_timeout' }), 4, 'and in breakwater_responses_cut_total, with the error that cut them')
    })
  }

  t.test('an endpoint that cuts its responses short is ejected', async (t) => {
    const bad = await upstream()
    const good = await upstream()
    const s = await startTestSidecar(t, {
      upstreams: { app: { endpoints: [bad.url, good.url], ejection: { consecutiveFailures: 2 } } },
      routes: [{ name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }]
    })
    // Both endpoints cut `/cut`: each takes about half of them.
    for (let i = 0; i < 4; i++) await raw(s.proxyPort, request('/cut'), 10_000)
    t.equal(bad.received.length + good.received.length, 4)
    t.ok(sumOf(await scrape(s.ops), 'breakwater_ejections_total', { upstream: 'app' }) >= 1, 'two in a row on one endpoint eject it')
  })

  t.test('a good response that ends after its endpoint was ejected does not end the ejection', async (t) => {
    const held: Array<() => void> = []
    const endpoint = (failing: boolean) => async (): Promise<TestUpstream> => {
      const up = await startUpstream((req, res) => {
        if (req.url === '/long') {
          res.writeHead(200, { 'content-length': '10' })
          res.write('12345')
          held.push(() => res.end('67890'))
          return
        }
        res.writeHead(failing ? 500 : 200)
        res.end('x')
      })
      t.teardown(up.close)
      return up
    }
    const [bad, good] = [await endpoint(true)(), await endpoint(false)()]
    const s = await startTestSidecar(t, {
      upstreams: { app: { endpoints: [bad.url, good.url], ejection: { consecutiveFailures: 2, baseMs: 60_000 } } },
      routes: [{ name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }]
    })
    // Long responses in flight on both endpoints, their heads already answered.
    const longs = [raw(s.proxyPort, 'GET /long HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n', 30_000), raw(s.proxyPort, 'GET /long HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n', 30_000)]
    t.ok(await eventually(() => held.length === 2), 'both endpoints are answering a long response')
    const ejected = async (): Promise<number> => sumOf(await scrape(s.ops), 'breakwater_upstream_endpoints', { upstream: 'app', state: 'ejected' })
    for (let i = 0; i < 10 && await ejected() === 0; i++) await send(s.proxy, '/x')
    t.equal(await ejected(), 1, 'the failing endpoint is ejected')
    for (const end of held) end()
    for (const answer of await Promise.all(longs)) t.match(answer, /^HTTP\/1\.1 200 [^]*1234567890$/, 'the long responses complete')
    t.equal(await ejected(), 1, 'and the ejection stands: those answers began before it')
  })

  t.test('a half-open probe is judged on its head; a body cut after it counts once in the closed circuit', async (t) => {
    let mode: 'fail' | 'cut' = 'fail'
    const up = await startUpstream((_req, res) => {
      if (mode === 'fail') { res.writeHead(500); res.end('no'); return }
      res.writeHead(200, { 'content-length': '1000' })
      res.write('partial')
      setTimeout(() => res.socket?.destroy(), 20)
    })
    const s = await halfOpen(t, up)
    mode = 'cut'
    await raw(s.proxyPort, request('/probe'), 10_000)
    t.equal(circuitOf(s, 'pay').state, 'closed', 'its good head closed the circuit')
    t.equal(circuitOf(s, 'pay').windowRequests, 1, 'and its cut body is in the new window')
    t.equal(circuitOf(s, 'pay').failureRate, 1, '... as a failure')
  })
})

t.test('a probe\'s body cut after its circuit opened and closed again is dropped, not counted against the new window', async (t) => {
  let mode: 'fail' | 'held' | 'ok' = 'fail'
  const cuts: Array<() => void> = []
  const up = await startUpstream((_req, res) => {
    if (mode === 'fail') { res.writeHead(500); res.end('no'); return }
    if (mode === 'ok') { res.writeHead(200); res.end('ok'); return }
    res.writeHead(200, { 'content-length': '1000' })
    res.write('partial')
    cuts.push(() => res.socket?.destroy())
  })
  const s = await halfOpen(t, up)
  mode = 'held'
  const first = await WireClient.connect(s.proxyPort)
  t.teardown(() => { first.destroy() })
  first.write('GET /first-probe HTTP/1.1\r\nHost: x\r\n\r\n')
  await first.until((c) => c.received.includes('partial'), 10_000, 'the first probe\'s head')
  t.ok(await eventually(() => circuitOf(s, 'pay').state === 'closed'), 'its good head closed the circuit')
  mode = 'fail'
  t.same([(await send(s.proxy, '/')).status, (await send(s.proxy, '/')).status], [500, 500])
  t.equal(circuitOf(s, 'pay').state, 'open', 'failures in that closed circuit opened it again')
  t.ok(await eventually(() => circuitOf(s, 'pay').state === 'half-open', 5000), 'half-open after recoveryTimeout')
  mode = 'ok'
  t.equal((await send(s.proxy, '/second-probe')).status, 200)
  t.equal(circuitOf(s, 'pay').state, 'closed', 'a second probe closed it: a new window')
  const lines = accessLines(s).length
  for (const cut of cuts) cut()
  await first.until((c) => c.closed, 10_000, 'the cut to reach the client')
  t.ok(await eventually(() => accessLines(s).length === lines + 1), 'the first probe ended')
  t.equal(accessLines(s).at(-1)?.outcome, 'upstream', 'as the upstream\'s failure')
  t.equal(circuitOf(s, 'pay').windowRequests, 0, 'which the new window, opened by another probe, does not count')
})

t.test('a verification probe is told to the verifier and left out of the trigger window; a client posing as one is counted', async (t) => {
  const up = await startUpstream((req, res) => { res.writeHead(req.url === '/fail' ? 500 : 200); res.end('x') })
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'off', match: { pathPrefix: '/off' }, upstream: 'app', killSwitch: 'newThing' }, { name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }],
    featureFlags: { newThing: false }
  })
  const told: Array<{ incident: string, route: string, atMs: number }> = []
  s.sidecar.dataPlane.onSynthetic = (incident, route, atMs) => { told.push({ incident, route, atMs }) }
  const probe = { headers: { 'x-breakwater-synthetic': 'i-probe', 'x-breakwater-probe': s.sidecar.dataPlane.probeKey } }
  t.equal((await send(s.proxy, '/ok', probe)).status, 200)
  t.equal((await send(s.proxy, '/fail', probe)).status, 500)
  t.equal((await send(s.proxy, '/off/x', probe)).status, 503, 'a kill switch\'s refusal: not in the windows')
  t.equal((await send(s.proxy, '/ok')).status, 200, 'real traffic')
  t.equal((await send(s.proxy, '/fail', { headers: { 'x-breakwater-synthetic': 'i-probe', 'x-breakwater-probe': 'guessed' } })).status, 500, 'a client posing as a probe')
  t.same(told.map((p) => [p.incident, p.route]), [['i-probe', 'app'], ['i-probe', 'app']], 'the two probes the windows would have counted; not the one without the key')
  const window = s.sidecar.dataPlane.runtime.routes.routes.find((r) => r.name === 'app')?.stats.window
  const sums = emptySums(false)
  const now = Math.floor(Date.now() / 1000)
  window?.sum(now - 60, now + 1, sums)
  t.same([sums.requests, sums.errors], [2, 1], 'the window holds the real request and the client posing as a probe, not the probes')
  const forwarded = up.received.find((r) => r.url === '/ok')?.headers
  t.equal(forwarded?.['x-breakwater-synthetic'], 'i-probe', 'the mark is forwarded')
  t.equal(forwarded?.['x-breakwater-probe'], undefined, 'the key is not')
})

t.test('client endings (aborts while waiting, aborted uploads, requests undici refuses) never eject an endpoint and never enter a trigger window', async (t) => {
  const handler = (req: any, res: any): void => {
    if ((req.url as string).startsWith('/hang')) return
    res.writeHead(200, { 'content-type': 'text/plain' })
    res.end('ok')
  }
  const a = await startUpstream(handler)
  const b = await startUpstream(handler)
  t.teardown(a.close)
  t.teardown(b.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { endpoints: [a.url, b.url], ejection: { consecutiveFailures: 2 } } },
    routes: [{ name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '60s', minRequests: 1, action: 'notify' }]
  })
  // Aborts while waiting for the response head, spread over both endpoints.
  const clients = await Promise.all(Array.from({ length: 6 }, async () => await WireClient.connect(s.proxyPort)))
  for (const c of clients) c.write('GET /hang HTTP/1.1\r\nHost: x\r\n\r\n')
  t.ok(await eventually(() => a.received.length + b.received.length === 6, 10_000), 'both endpoints hold the requests')
  for (const c of clients) c.destroy()
  t.ok(await eventually(() => a.aborted + b.aborted === 6, 10_000))
  // Uploads the clients abandon half-way.
  const uploads = await Promise.all(Array.from({ length: 4 }, async () => await WireClient.connect(s.proxyPort)))
  for (const c of uploads) c.write('POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n' + 'x'.repeat(1000))
  t.ok(await eventually(() => s.sidecar.dataPlane.stats.inFlight === 4, 10_000), 'the uploads are in flight')
  for (const c of uploads) c.destroy()
  t.ok(await eventually(() => s.sidecar.dataPlane.stats.inFlight === 0, 10_000))
  // Requests undici will not send as they are.
  for (let i = 0; i < 6; i++) t.equal(parseResponse(await raw(s.proxyPort, DUPLICATE_HOST)).status, 400)
  // Then three good requests.
  for (let i = 0; i < 3; i++) t.equal((await send(s.proxy, '/ok')).status, 200)

  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_ejections_total', { upstream: 'app' }), 0, 'no endpoint was ejected')
  t.equal(sumOf(samples, 'breakwater_upstream_endpoints', { upstream: 'app', state: 'ready' }), 2, 'both endpoints ready')
  const trigger = await triggerOf(s, 'errors')
  t.equal(trigger.requests, 3, 'the window holds only the three requests the upstream answered')
  t.equal(trigger.errors, 0, 'and no error')
  t.equal(accessLines(s).filter((l) => l.outcome === 'client').length, 16, 'the 16 client endings are logged as such')
})

t.test('a client that ends its connection half-way through an upload has left: counted as leaving (499), not as a bad request', async (t) => {
  const { s, client } = await uploader(t)
  client.write('POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n' + 'x'.repeat(1000))
  t.ok(await eventually(() => s.sidecar.dataPlane.stats.inFlight === 1, 10_000), 'the upload is in flight')
  client.socket.end() // FIN half-way: the rest of the body never comes
  await client.until((c) => c.closed, 5000, 'the connection to close')
  t.notMatch(client.received, /400 Bad Request/, 'no 400 for a client that left')
  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_client_errors_total', { error: 'bad_request' }), 0, 'not counted as a bad request')
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '499' }), 1, 'counted once, as the client leaving')
})

t.test('a request undici refuses because of the request itself: 400 bad_request, no upstream contact, circuit and window untouched', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }],
    circuitBreakers: { app: { volumeThreshold: 5 } },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '60s', minRequests: 1, action: 'notify' }]
  })
  for (let i = 0; i < 25; i++) {
    const res = parseResponse(await raw(s.proxyPort, DUPLICATE_HOST))
    t.equal(res.status, 400)
    t.equal(res.headers['x-breakwater-error'], 'bad_request')
    t.equal((JSON.parse(res.body) as { error: string }).error, 'bad_request')
  }
  t.equal(up.received.length, 0, 'the upstream saw none of them')
  t.equal(circuitOf(s, 'app').state, 'closed', '25 refused requests did not open the circuit')
  t.equal(circuitOf(s, 'app').windowRequests, 0, 'nor entered its window')
  const trigger = await triggerOf(s, 'errors')
  t.equal(trigger.requests, 0, 'nor the trigger window')
  t.equal(trigger.value, null)
  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '400', source: 'breakwater' }), 25, 'counted as our 400s (refused at the head, before a route)')
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '502' }), 0, 'never a 502')
  t.ok(accessLines(s).every((l) => l.outcome === 'client' && l['error.type'] === 'bad_request'), 'logged as the client\'s doing')
  t.equal((await send(s.proxy, '/fine')).status, 200, 'a good request goes through')
})

t.test('breakwater_requests_total says who produced the status: source="upstream" or "breakwater"', async (t) => {
  const up = await startUpstream((req, res) => {
    res.writeHead(req.url === '/busy' ? 503 : 200, { 'content-type': 'text/plain' })
    res.end('answer')
  })
  t.teardown(up.close)
  const down = await refusedUrl()
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url }, gone: { url: down } },
    routes: [
      { name: 'off', match: { pathPrefix: '/off' }, upstream: 'app', killSwitch: 'offFeature' },
      { name: 'gone', match: { pathPrefix: '/gone' }, upstream: 'gone' },
      { name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { offFeature: false }
  })
  t.equal((await send(s.proxy, '/busy')).status, 503)
  t.equal((await send(s.proxy, '/fine')).status, 200)
  t.equal((await send(s.proxy, '/off')).status, 503)
  t.equal((await send(s.proxy, '/gone')).status, 502)
  const samples = await scrape(s.ops)
  const of = (labels: Record<string, string>): number => sumOf(samples, 'breakwater_requests_total', labels)
  t.equal(of({ route: 'app', code: '503', source: 'upstream' }), 1, 'the app\'s own 503')
  t.equal(of({ route: 'app', code: '200', source: 'upstream' }), 1)
  t.equal(of({ route: 'off', code: '503', source: 'breakwater' }), 1, 'a kill switch\'s 503 is ours')
  t.equal(of({ route: 'gone', code: '502', source: 'breakwater' }), 1, 'so is a 502')
  t.equal(of({ route: 'app', source: 'breakwater' }), 0)
  const sources = new Set(samples.filter((x) => x.name === 'breakwater_requests_total').map((x) => x.labels.source))
  t.same([...sources].sort(), ['breakwater', 'upstream'], 'the label has two values')
})

t.test('502 and 504 bodies say which upstream failed, where, and how', async (t) => {
  const down = await refusedUrl()
  const up = await startUpstream(hang)
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: down }, slow: { url: up.url } },
    routes: [
      { name: 'slow', match: { pathPrefix: '/slow' }, upstream: 'slow', timeoutMs: 200 },
      { name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }
    ]
  })
  const refused = await send(s.proxy, '/x')
  t.equal(refused.status, 502)
  const body = refused.json<{ error: string, message: string, requestId: string }>()
  t.same(Object.keys(body).sort(), ['error', 'message', 'requestId'], 'the JSON shape of SPEC §3')
  t.equal(body.error, 'upstream_unavailable')
  t.equal(body.message, `upstream "app" (${down.replace('http://', '')}): connection refused`)
  const slow = await send(s.proxy, '/slow')
  t.equal(slow.status, 504)
  t.equal(slow.json<{ error: string }>().error, 'upstream_timeout')
  t.equal(slow.json<{ message: string }>().message, `upstream "slow" (127.0.0.1:${up.port}): no response headers within 200 ms`)
})

t.test('WebSocket handshakes run the same stages as every request', async (t) => {
  t.test('a killed route: 503 feature_disabled, counted and logged like an HTTP request', async (t) => {
    const ws = await startWebSocketUpstream()
    t.teardown(ws.close)
    const s = await startTestSidecar(t, {
      upstreams: { ws: { url: ws.url } },
      routes: [{ name: 'chat', match: { pathPrefix: '/ws' }, upstream: 'ws', killSwitch: 'enableChat' }],
      featureFlags: { enableChat: false }
    })
    const res = parseResponse(await raw(s.proxyPort, handshakeRequest('/ws', KEY, ['x-request-id: ws-killed'])))
    t.equal(res.status, 503)
    t.equal(res.headers['x-breakwater-error'], 'feature_disabled')
    t.equal(ws.handshakes.length, 0)
    const samples = await scrape(s.ops)
    t.equal(sumOf(samples, 'breakwater_requests_total', { route: 'chat', code: '503', source: 'breakwater' }), 1, 'counted')
    t.equal(sumOf(samples, 'breakwater_rejections_total', { route: 'chat', reason: 'kill_switch' }), 1, 'as a kill-switch rejection')
    const line = accessLines(s).find((l) => l.requestId === 'ws-killed')
    t.ok(line, 'one access-log line')
    t.equal(line?.['http.response.status_code'], 503)
    t.equal(line?.['error.type'], 'feature_disabled')
    t.equal(line?.outcome, 'breakwater')
    t.equal(line?.route, 'chat')
    t.equal(line?.upgrade, 'websocket')
  })

  t.test('the bulkhead and the admission limit refuse a handshake like any request; an open tunnel holds no slot', async (t) => {
    const never = await startUpstream(hang)
    t.teardown(never.close)
    const ws = await startWebSocketUpstream()
    t.teardown(ws.close)
    const s = await startTestSidecar(t, {
      upstreams: { stuck: { url: never.url }, ws: { url: ws.url } },
      routes: [
        { name: 'stuck', match: { pathPrefix: '/stuck' }, upstream: 'stuck' },
        { name: 'chat', match: { pathPrefix: '/ws' }, upstream: 'ws' }
      ],
      circuitBreakers: { stuck: { maxConcurrentRequests: 1 }, ws: { maxConcurrentRequests: 1 } }
    })
    const waiting = await WireClient.connect(s.proxyPort)
    t.teardown(() => waiting.destroy())
    waiting.write(handshakeRequest('/stuck', KEY, ['x-request-id: ws-waiting']))
    t.ok(await eventually(() => never.received.length === 1, 5000), 'a handshake the upstream never answers is in flight')
    const full = parseResponse(await raw(s.proxyPort, handshakeRequest('/stuck', KEY)))
    t.equal(full.status, 503)
    t.equal(full.headers['x-breakwater-error'], 'bulkhead_full', 'a second handshake is refused by the bulkhead')
    t.equal(full.headers['x-breakwater-mitigation'], 'bulkhead')
    t.equal(never.received.length, 1, 'and never reached the upstream')
    const samples = await scrape(s.ops)
    t.equal(sumOf(samples, 'breakwater_rejections_total', { route: 'stuck', reason: 'bulkhead' }), 1)
    waiting.destroy()
    t.ok(await eventually(() => s.sidecar.dataPlane.stats.inFlight === 0, 5000), 'the abandoned handshake left the bulkhead')
    t.ok(await eventually(() => accessLines(s).some((l) => l.requestId === 'ws-waiting')), 'and was logged')
    t.equal(accessLines(s).find((l) => l.requestId === 'ws-waiting')?.outcome, 'client', 'as the client\'s doing')

    // A handshake holds a slot until the upstream answers; the tunnel after it is a connection, not a request.
    const first = await WireClient.connect(s.proxyPort)
    t.teardown(() => first.destroy())
    first.write(handshakeRequest('/ws', KEY))
    await first.until((c) => c.received.includes('\r\n\r\n'))
    t.equal(parseResponse(first.received).status, 101)
    const second = await WireClient.connect(s.proxyPort)
    t.teardown(() => second.destroy())
    second.write(handshakeRequest('/ws', KEY))
    await second.until((c) => c.received.includes('\r\n\r\n'))
    t.equal(parseResponse(second.received).status, 101, 'a second tunnel opens beside it')
    t.equal(s.sidecar.dataPlane.runtime.upstreams.get('ws')?.inFlight, 0, 'the open tunnels hold no slot')

    const limited = await startTestSidecar(t, {
      upstreams: { stuck: { url: never.url }, ws: { url: ws.url } },
      routes: [
        { name: 'stuck', match: { pathPrefix: '/stuck' }, upstream: 'stuck' },
        { name: 'chat', match: { pathPrefix: '/ws' }, upstream: 'ws' }
      ],
      limits: { maxInFlight: 1 }
    })
    const plain = await WireClient.connect(limited.proxyPort)
    t.teardown(() => plain.destroy())
    plain.write('GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n')
    t.ok(await eventually(() => limited.sidecar.dataPlane.stats.inFlight === 1, 5000), 'one plain request in flight')
    const shed = parseResponse(await raw(limited.proxyPort, handshakeRequest('/ws', KEY)))
    t.equal(shed.status, 503)
    t.equal(shed.headers['x-breakwater-error'], 'overloaded', 'admission refuses the handshake')
  })

  t.test('the breaker counts handshakes: refused upgrades with a failure status open it', async (t) => {
    const ws = await startWebSocketUpstream({ refuse: 503 })
    t.teardown(ws.close)
    const s = await startTestSidecar(t, {
      upstreams: { ws: { url: ws.url } },
      routes: [{ name: 'chat', match: { pathPrefix: '/ws' }, upstream: 'ws' }],
      circuitBreakers: { ws: { volumeThreshold: 2, recoveryTimeout: 60_000 } }
    })
    for (let i = 0; i < 2; i++) t.equal(parseResponse(await raw(s.proxyPort, handshakeRequest('/ws', KEY))).status, 503, 'the upstream refuses with 503')
    t.equal(circuitOf(s, 'ws').state, 'open', 'two failed handshakes opened the circuit')
    const refused = parseResponse(await raw(s.proxyPort, handshakeRequest('/ws', KEY)))
    t.equal(refused.headers['x-breakwater-error'], 'circuit_open')
    t.equal(ws.handshakes.length, 2, 'the third never reached the upstream')
    const lines = accessLines(s)
    t.same(lines.map((l) => l.outcome), ['upstream', 'upstream', 'breakwater'], 'each handshake logged with its cause')
  })

  t.test('a refusal whose body the upstream cuts short is a failure for the breaker too', async (t) => {
    // A plain server: it answers the handshake with a 403 that promises 1,000 bytes and sends 7.
    const up = await startUpstream((_req, res) => {
      res.writeHead(403, { 'content-length': '1000' })
      res.write('partial')
      setTimeout(() => res.socket?.destroy(), 20)
    })
    t.teardown(up.close)
    const s = await startTestSidecar(t, {
      upstreams: { ws: { url: up.url } },
      routes: [{ name: 'chat', match: { pathPrefix: '/ws' }, upstream: 'ws' }],
      circuitBreakers: { ws: { volumeThreshold: 2, failureThreshold: 0.5, recoveryTimeout: 60_000 } }
    })
    for (let i = 0; i < 2; i++) t.match(await raw(s.proxyPort, handshakeRequest('/ws', KEY), 10_000), /^HTTP\/1\.1 403 /, 'the refusal is relayed, then cut')
    t.same(accessLines(s).map((l) => [l.outcome, l['error.type']]), [['upstream', 'upstream_reset'], ['upstream', 'upstream_reset']])
    t.equal(circuitOf(s, 'ws').state, 'open', 'and the breaker counted both as failures')
  })

  /**
   * A handshake to an upstream whose refusal promises 1,000 bytes, sends 7, and then nothing,
   * read up to those 7 bytes; `route` adds to the route, `input` to the sidecar's config.
   */
  async function stalledRefusal (t: Test, route: Record<string, unknown> = {}, input: Record<string, unknown> = {}): Promise<{ up: TestUpstream, s: TestSidecar, client: WireClient }> {
    const up = await startUpstream((_req, res) => {
      res.writeHead(403, { 'content-length': '1000' })
      res.write('partial')
    })
    t.teardown(up.close)
    const s = await startTestSidecar(t, {
      upstreams: { ws: { url: up.url } },
      routes: [{ name: 'chat', match: { pathPrefix: '/ws' }, upstream: 'ws', ...route }],
      circuitBreakers: { ws: { volumeThreshold: 5, recoveryTimeout: 60_000 } },
      ...input
    })
    const client = await WireClient.connect(s.proxyPort)
    t.teardown(() => client.destroy())
    client.write(handshakeRequest('/ws', KEY))
    await client.until((c) => c.received.includes('partial'), 10_000, 'the refusal\'s head and first bytes')
    return { up, s, client }
  }

  t.test('a client that leaves during a refusal\'s body ends the handshake at once: outcome client, its slot freed, never a success', async (t) => {
    const { up, s, client } = await stalledRefusal(t)
    client.destroy()
    t.ok(await eventually(() => s.sidecar.dataPlane.stats.inFlight === 0, 10_000), 'the handshake no longer holds a slot')
    t.ok(await eventually(() => up.aborted === 1, 10_000), 'its upstream request was given up')
    t.same(accessLines(s).map((l) => [l['http.response.status_code'], l.outcome]), [[403, 'client']], 'the status it got, and the client\'s leaving as the cause')
    t.equal(circuitOf(s, 'ws').windowRequests, 0, 'not a success in the breaker\'s window')
  })

  t.test('a refusal whose body stalls while the client waits is the upstream\'s timeout after idleTimeoutMs: slot freed, a failure for the breaker', async (t) => {
    // The client stays.
    const { s, client } = await stalledRefusal(t, { idleTimeoutMs: 300 })
    await client.until((c) => c.closed, 60_000, 'the connection ended once the body stalled for idleTimeoutMs')
    t.ok(await eventually(() => s.sidecar.dataPlane.stats.inFlight === 0, 10_000), 'the handshake no longer holds a slot')
    t.same(accessLines(s).map((l) => [l['http.response.status_code'], l.outcome, l['error.type']]), [[403, 'upstream', 'upstream_timeout']], 'the status it got, the upstream\'s stall as the cause')
    t.equal(circuitOf(s, 'ws').windowRequests, 1, 'counted in the breaker\'s window')
  })

  t.test('a refusal whose body is still coming at the shutdown deadline is cut by Breakwater: shutdown_deadline, not the upstream\'s reset', async (t) => {
    const { s, client } = await stalledRefusal(t, {}, { shutdown: { drainDelayMs: 0, timeoutMs: 1000 } })
    await s.sidecar.shutdown()
    await client.until((c) => c.closed, 10_000, 'the cut to reach the client')
    t.same(accessLines(s).map((l) => [l['http.response.status_code'], l.outcome, l['error.type']]), [[403, 'breakwater', 'shutdown_deadline']], 'the status it got stands; the cut is the sidecar\'s doing')
    t.equal(circuitOf(s, 'ws').windowRequests, 0, 'nothing for the breaker to hold against the upstream')
  })
})

t.test('OPTIONS * pings are answered by Breakwater: outcome breakwater, never a success in a trigger window that would dilute the app\'s errors', async (t) => {
  const up = await startUpstream((_req, res) => { res.writeHead(500); res.end('down') })
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.6, window: '60s', minRequests: 1, action: 'notify' }]
  })
  for (let i = 0; i < 4; i++) t.equal((await send(s.proxy, '/pay')).status, 500)
  for (let i = 0; i < 4; i++) {
    const ping = parseResponse(await raw(s.proxyPort, 'OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'))
    t.equal(ping.status, 200, 'the ping is answered')
  }
  const trigger = await triggerOf(s, 'errors')
  t.same([trigger.requests, trigger.errors], [4, 4], 'the window holds the app\'s four failures, not the pings')
  t.equal(trigger.state, 'fired', 'so the trigger fires on the app\'s error rate')
  const pings = accessLines(s).filter((l) => l['http.request.method'] === 'OPTIONS')
  t.equal(pings.length, 4)
  t.ok(pings.every((l) => l.outcome === 'breakwater' && l['http.response.status_code'] === 200), 'logged as Breakwater\'s own answer')
  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '200', source: 'breakwater' }), 4, 'and counted as such')
})

t.test('a response whose body is still coming at the shutdown deadline is cut by Breakwater: outcome breakwater, shutdown_deadline, never the app\'s success', async (t) => {
  const up = await startUpstream((_req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '1000' })
    res.write('partial') // the rest is still to come at the deadline
  })
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'app', match: { pathPrefix: '/' }, upstream: 'app' }],
    shutdown: { drainDelayMs: 0, timeoutMs: 1000 }
  })
  const client = await WireClient.connect(s.proxyPort)
  t.teardown(() => client.destroy())
  client.write('GET /download HTTP/1.1\r\nHost: x\r\n\r\n')
  await client.until((c) => c.received.includes('partial'), 10_000, 'the head and the first bytes')
  await s.sidecar.shutdown()
  await client.until((c) => c.closed, 10_000, 'the cut to reach the client')
  const line = accessLines(s).find((l) => l['url.path'] === '/download')
  t.equal(line?.['http.response.status_code'], 200, 'the status it got stands')
  t.equal(line?.outcome, 'breakwater', 'the cut is the sidecar\'s doing, not a success')
  t.equal(line?.['error.type'], 'shutdown_deadline', 'and the line says why')
})

t.test('an upload whose chunked framing breaks mid-body: the client\'s 400 is the request\'s own, logged and counted as the 400 it got', async (t) => {
  const { s, client } = await uploader(t)
  client.write('POST /upload HTTP/1.1\r\nHost: x\r\nx-request-id: broken-1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n')
  t.ok(await eventually(() => s.sidecar.dataPlane.stats.inFlight === 1, 10_000), 'the upload is in flight')
  client.write('ZZZ\r\n') // not a chunk size
  await client.until((c) => c.closed, 10_000, 'the connection to close')
  const res = parseResponse(client.received)
  t.equal(res.status, 400)
  t.equal(res.headers['x-breakwater-error'], 'bad_request')
  t.equal(res.headers['x-request-id'], 'broken-1', 'the 400 names the request it refuses')
  t.ok(await eventually(() => accessLines(s).length === 1, 10_000))
  const line = accessLines(s)[0]
  t.equal(line?.requestId, 'broken-1')
  t.equal(line?.['http.response.status_code'], 400, 'the access log says the 400 the client got, not 499')
  t.equal(line?.outcome, 'client')
  t.equal(line?.['error.type'], 'bad_request')
  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '400', source: 'breakwater' }), 1, 'counted as the 400 it was')
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '499' }), 0, 'not as a client that left')
  t.equal(sumOf(samples, 'breakwater_client_errors_total', { error: 'bad_request' }), 1, 'one bad request')
  t.ok(await eventually(() => s.sidecar.dataPlane.stats.inFlight === 0, 10_000), 'nothing left in flight')
})
