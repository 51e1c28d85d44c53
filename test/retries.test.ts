import t from 'tap'
import { Readable } from 'node:stream'
import { startUpstream, echo, refusedUrl, type TestUpstream, type Handler } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { send, sleep, eventually } from './helpers/http.js'
import { Pool } from 'undici'
import { scrape, sumOf } from './helpers/metrics.js'
import type { Test } from 'tap'

async function upstreams (t: Test, handlers: Handler[]): Promise<TestUpstream[]> {
  const out: TestUpstream[] = []
  for (const h of handlers) {
    const up = await startUpstream(h)
    t.teardown(up.close)
    out.push(up)
  }
  return out
}

function retrying (endpoints: string[], retries: Record<string, unknown> = { attempts: 1 }, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    upstreams: { app: { endpoints, ...extra } },
    routes: [{ name: 'r', match: { pathPrefix: '/' }, upstream: 'app', retries }]
  }
}

/** A 503 the upstream sends itself, labelled so a test can tell who answered. */
const unavailable = (label: string, headers: Record<string, string> = {}): Handler => (_req, res) => {
  res.writeHead(503, { 'content-type': 'text/plain', ...headers })
  res.end(label)
}

t.test('GET is retried on another endpoint when the connection is refused', async (t) => {
  const [good] = await upstreams(t, [echo]) as [TestUpstream]
  const { proxy, ops } = await startTestSidecar(t, retrying([await refusedUrl(), good.url]))
  for (let i = 0; i < 20; i++) {
    const res = await send(proxy, `/g/${i}`)
    t.equal(res.status, 200, `request ${i} answered by the live endpoint`)
  }
  t.equal(good.received.length, 20)
  const retries = sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' })
  t.ok(retries >= 1, `retries were made (${retries})`)
})

t.test('POST is never retried', async (t) => {
  const eps = await upstreams(t, [unavailable('zero'), unavailable('one')])
  const { proxy, ops } = await startTestSidecar(t, retrying(eps.map((e) => e.url)))
  const res = await send(proxy, '/p', { method: 'POST' })
  t.equal(res.status, 503, 'the upstream\'s 503 is relayed')
  t.equal(res.headers['x-breakwater-error'], undefined, 'not a local error')
  t.equal(eps[0]!.received.length + eps[1]!.received.length, 1, 'the upstream saw exactly one request')
  t.equal(sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' }), 0)

  // Nor on a refused connection: a POST may not be repeated even when nothing was sent.
  const refused = await startTestSidecar(t, retrying([await refusedUrl(), eps[0]!.url]))
  const before = eps[0]!.received.length
  const failed = await send(refused.proxy, '/p', { method: 'POST' })
  t.equal(failed.status, 502, 'the first endpoint refused: 502, not a retry')
  t.equal(eps[0]!.received.length, before)
})

t.test('GET is retried on a 503: first endpoint 503, second 200', async (t) => {
  const [flaky, good] = await upstreams(t, [unavailable('flaky'), echo]) as [TestUpstream, TestUpstream]
  const { proxy, ops } = await startTestSidecar(t, retrying([flaky.url, good.url]))
  for (let i = 0; i < 6; i++) {
    const res = await send(proxy, `/r/${i}`)
    t.equal(res.status, 200, `request ${i} succeeds`)
  }
  t.ok(flaky.received.length >= 1, `the 503 endpoint was tried (${flaky.received.length})`)
  t.equal(good.received.length, 6, 'every request ended on the healthy endpoint')
  const samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_retries_total', { route: 'r' }), flaky.received.length, 'breakwater_retries_total counts one retry per 503')
  t.equal(sumOf(samples, 'breakwater_requests_total', { route: 'r', code: '200' }), 6, 'a retried request is counted once, with its final status')
  t.equal(sumOf(samples, 'breakwater_requests_total', { route: 'r', code: '503' }), 0)
})

t.test('a 503 carrying x-breakwater-mitigation is not retried', async (t) => {
  const eps = await upstreams(t, [
    unavailable('zero', { 'x-breakwater-mitigation': 'kill-switch' }),
    unavailable('one', { 'x-breakwater-mitigation': 'kill-switch' })
  ])
  const { proxy, ops } = await startTestSidecar(t, retrying(eps.map((e) => e.url)))
  const res = await send(proxy, '/m')
  t.equal(res.status, 503)
  t.equal(res.headers['x-breakwater-mitigation'], 'kill-switch', 'relayed as the upstream sent it')
  t.equal(eps[0]!.received.length + eps[1]!.received.length, 1, 'a deliberate refusal is not retried')
  t.equal(sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' }), 0)
})

t.test('a request with a body is not retried, even with an idempotent method', async (t) => {
  const eps = await upstreams(t, [unavailable('zero'), unavailable('one')])
  const { proxy, ops } = await startTestSidecar(t, retrying(eps.map((e) => e.url)))
  const res = await send(proxy, '/b', { method: 'PUT', body: 'payload' })
  t.equal(res.status, 503)
  t.equal(eps[0]!.received.length + eps[1]!.received.length, 1, 'the body was sent once')
  const chunked = await send(proxy, '/b', { method: 'DELETE', body: Readable.from((async function * () { yield Buffer.from('x') })()) })
  t.equal(chunked.status, 503)
  t.equal(eps[0]!.received.length + eps[1]!.received.length, 2, 'a chunked body too')
  t.equal(sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' }), 0)
})

t.test('retry budget: with no budget no retry is made, and the refusal is counted', async (t) => {
  const eps = await upstreams(t, [unavailable('zero'), unavailable('one')])
  const { proxy, ops } = await startTestSidecar(t, retrying(eps.map((e) => e.url), { attempts: 1, budgetPercent: 0, minRetriesPerSecond: 0 }))
  for (let i = 0; i < 3; i++) t.equal((await send(proxy, `/x/${i}`)).status, 503)
  t.equal(eps[0]!.received.length + eps[1]!.received.length, 3, 'one attempt per request')
  const samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_retries_total', { route: 'r' }), 0, 'no retries')
  t.equal(sumOf(samples, 'breakwater_retry_budget_exhausted_total', { route: 'r' }), 3, 'breakwater_retry_budget_exhausted_total grows per refused retry')
})

t.test('retry budget: budgetPercent bounds retries to a share of requests', async (t) => {
  // Every first attempt fails (both endpoints 503): only the budget decides. 50 % of 10
  // requests is 5 retries (no floor).
  const eps = await upstreams(t, [unavailable('zero'), unavailable('one')])
  const { proxy, ops } = await startTestSidecar(t, retrying(eps.map((e) => e.url), { attempts: 1, budgetPercent: 50, minRetriesPerSecond: 0 }))
  for (let i = 0; i < 10; i++) await send(proxy, `/x/${i}`)
  const samples = await scrape(ops)
  const retries = sumOf(samples, 'breakwater_retries_total', { route: 'r' })
  const exhausted = sumOf(samples, 'breakwater_retry_budget_exhausted_total', { route: 'r' })
  t.ok(retries >= 4 && retries <= 5, `about half the requests were retried (${retries})`)
  t.equal(retries + exhausted, 10, 'every failed first attempt either retried or counted as exhausted')
  t.equal(eps[0]!.received.length + eps[1]!.received.length, 10 + retries)
})

t.test('attempts bounds the retries of one request', async (t) => {
  const eps = await upstreams(t, [unavailable('a'), unavailable('b'), unavailable('c'), unavailable('d')])
  const { proxy, ops } = await startTestSidecar(t, retrying(eps.map((e) => e.url), { attempts: 2 }))
  const res = await send(proxy, '/a')
  t.equal(res.status, 503, 'the last attempt\'s 503 is relayed')
  t.equal(eps.reduce((n, e) => n + e.received.length, 0), 3, 'one try and two retries')
  t.equal(sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' }), 2)
})

t.test('a reset on a reused upstream connection before any response byte', async (t) => {
  // The upstream answers the first request on each connection and drops the connection on
  // the second, without a byte of response: the race of a keep-alive connection closed by
  // the upstream just as the proxy reuses it.
  async function dropsReused (t: Test): Promise<{ proxy: string, up: TestUpstream }> {
    const perSocket = new WeakMap<object, number>()
    const up = await startUpstream((req, res, body) => {
      const n = (perSocket.get(req.socket) ?? 0) + 1
      perSocket.set(req.socket, n)
      if (n >= 2) { req.socket.destroy(); return }
      echo(req, res, body)
    })
    t.teardown(up.close)
    const { proxy } = await startTestSidecar(t, {
      upstreams: { app: { url: up.url } },
      routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }]
    })
    t.equal((await send(proxy, '/first')).status, 200, 'the first request opens a connection')
    return { proxy, up }
  }

  t.test('is retried once for an idempotent method, even without retries configured', async (t) => {
    const { proxy, up } = await dropsReused(t)
    const second = await send(proxy, '/second')
    t.equal(second.status, 200, 'GET on the reused connection: reset, retried on a new one, answered')
    t.equal(up.received.filter((r) => r.url === '/second').length, 2, 'tried twice')
  })

  t.test('is not retried for POST', async (t) => {
    const { proxy, up } = await dropsReused(t)
    const post = await send(proxy, '/post', { method: 'POST' })
    t.equal(post.status, 502, 'POST on the reused connection: not repeated')
    t.equal(up.received.filter((r) => r.url === '/post').length, 1)
  })
})

t.test('a reset after the first bytes of a response is not retried: the upstream has answered', async (t) => {
  // The upstream answers the first request on each connection and, on the second, sends the
  // start of a response head and drops the connection: the request reached the app, which
  // began to answer. Neither the keep-alive race retry nor `retries` may send it again.
  async function cutsHead (t: Test, retries?: Record<string, unknown>): Promise<{ proxy: string, ops: string, up: TestUpstream }> {
    const perSocket = new WeakMap<object, number>()
    const up = await startUpstream((req, res, body) => {
      const n = (perSocket.get(req.socket) ?? 0) + 1
      perSocket.set(req.socket, n)
      if (n >= 2) {
        req.socket.write('HTTP/1.1 200 OK\r\nx-partial: yes\r\n', () => { req.socket.destroy() })
        return
      }
      echo(req, res, body)
    })
    t.teardown(up.close)
    const { proxy, ops } = await startTestSidecar(t, {
      upstreams: { app: { url: up.url } },
      routes: [{ name: 'r', match: { pathPrefix: '/' }, upstream: 'app', ...(retries === undefined ? {} : { retries }) }]
    })
    t.equal((await send(proxy, '/first')).status, 200, 'the first request opens a connection')
    return { proxy, ops, up }
  }

  for (const method of ['GET', 'PUT']) {
    t.test(`${method} on the reused connection`, async (t) => {
      const { proxy, ops, up } = await cutsHead(t)
      const res = await send(proxy, '/second', { method })
      t.equal(res.status, 502, 'the cut is answered 502')
      t.equal(up.received.filter((r) => r.url === '/second').length, 1, 'the upstream saw it once')
      t.equal(sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' }), 0, 'no retry counted')
    })
  }

  t.test('GET with retries configured', async (t) => {
    const { proxy, ops, up } = await cutsHead(t, { attempts: 2 })
    const res = await send(proxy, '/second')
    t.equal(res.status, 502, 'the cut is answered 502')
    t.equal(up.received.filter((r) => r.url === '/second').length, 1, 'the upstream saw it once')
    t.equal(sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' }), 0, 'no retry counted')
  })
})

t.test('an upstream that closes each connection right after its response: no request fails', async (t) => {
  // The keep-alive race: the proxy reuses a pooled connection the upstream is closing. A
  // request that never reached the upstream is retried on a fresh connection (SPEC §14).
  const closing = (announce: boolean): Handler => (req, res, body) => {
    if (announce) res.setHeader('connection', 'close')
    // Closed a moment after the response, as an idle timeout of a few milliseconds would.
    res.on('finish', () => { setTimeout(() => req.socket.destroy(), Math.random() * 6) })
    echo(req, res, body)
  }
  for (const announce of [false, true]) {
    t.test(announce ? 'announced with Connection: close' : 'without a word', async (t) => {
      const up = await startUpstream(closing(announce))
      t.teardown(up.close)
      const { proxy, ops } = await startTestSidecar(t, {
        upstreams: { app: { url: up.url } },
        routes: [{ name: 'r', match: { pathPrefix: '/' }, upstream: 'app' }]
      })
      const pool = new Pool(proxy, { connections: 20 })
      t.teardown(async () => await pool.destroy())
      const failures: string[] = []
      const one = async (i: number): Promise<void> => {
        const post = i % 2 === 1
        const res = await pool.request({ path: `/r/${i}`, method: post ? 'POST' : 'GET', body: post ? `order ${i}` : undefined })
        const text = await res.body.text()
        if (res.statusCode !== 200) failures.push(`${post ? 'POST' : 'GET'} ${res.statusCode} ${text}`)
        else if (post && (JSON.parse(text) as { body: string }).body !== `order ${i}`) failures.push(`POST ${i}: body lost`)
      }
      // A POST written on a pooled connection as the upstream closes it cannot be proven unsent,
      // so it is not retried (SPEC §14): it goes on a fresh connection once the sidecar has seen
      // this upstream close connections on its own (upstreams.ts `reusable`). One round of GETs
      // lets it see that (their own races are retried); 20 ms lets the last closes arrive.
      await Promise.all(Array.from({ length: 20 }, async (_, k) => await one(2 * k)))
      await sleep(20)
      const warm = up.received.length
      for (let round = 0; round < 20; round++) await Promise.all(Array.from({ length: 20 }, async (_, k) => await one(round * 20 + k)))
      t.same(failures, [], '20 GETs, then 400 concurrent GETs and POSTs, none failed')
      const posts = up.received.slice(warm).filter((r) => r.method === 'POST').length
      t.equal(posts, 200, 'each POST ran exactly once upstream')
      t.comment(`retries: ${sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' })}`)
    })
  }
})

t.test('a retry is not sent once the circuit has opened: the upstream sees nothing more', async (t) => {
  // /slow's first attempt is answered 503 only after two other requests have opened the circuit.
  let release: () => void = () => {}
  const released = new Promise<void>((resolve) => { release = resolve })
  const handler: Handler = (req, res) => {
    if (req.url?.startsWith('/slow') === true) { void released.then(() => unavailable('slow')(req, res, Buffer.alloc(0))); return }
    unavailable('fail')(req, res, Buffer.alloc(0))
  }
  const eps = await upstreams(t, [handler, handler])
  const { proxy, ops } = await startTestSidecar(t, {
    ...retrying(eps.map((e) => e.url), { attempts: 2 }),
    circuitBreakers: { app: { volumeThreshold: 2, failureThreshold: 0.5, recoveryTimeout: 60_000 } }
  })
  const seen = (): number => eps.reduce((n, e) => n + e.received.filter((r) => r.url.startsWith('/slow')).length, 0)
  const slow = send(proxy, '/slow')
  t.ok(await eventually(() => seen() === 1), 'the first attempt of /slow reached the upstream')
  for (let i = 0; i < 2; i++) t.equal((await send(proxy, `/fail/${i}`)).status, 503)
  const refused = await send(proxy, '/after')
  t.equal(refused.headers['x-breakwater-error'], 'circuit_open', 'the circuit is open')
  const retriesBefore = sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' })
  release()
  const res = await slow
  t.equal(res.status, 503, 'the upstream\'s own 503 is relayed')
  t.equal(res.headers['x-breakwater-error'], undefined, 'not a local refusal')
  t.equal(seen(), 1, 'no retry reached the upstream after the circuit opened')
  t.equal(sumOf(await scrape(ops), 'breakwater_retries_total', { route: 'r' }), retriesBefore, 'no retry counted')
})
