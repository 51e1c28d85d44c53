import t from 'tap'
import { ROOT } from './helpers/root.js'
import { readFileSync } from 'node:fs'
import { resolve } from 'node:path'
import http from 'node:http'
import { Readable } from 'node:stream'
import { Client } from 'undici'
import { startUpstream, delay, hang, reset, failMidBody, refusedUrl, echo } from './helpers/upstream.js'
import { startTestSidecar, oneRoute } from './helpers/sidecar.js'
import { send, raw, eventually, sleep } from './helpers/http.js'
import { WireClient } from './helpers/wire.js'
import { ERRORS } from '../src/proxy/errors.js'

interface ErrorBody { error: string, message: string, requestId: string }

t.test('no route: 404 no_route as JSON with x-breakwater-error', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxy } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/api' }, upstream: 'app' }]
  })
  const res = await send(proxy, '/elsewhere', { headers: { 'x-request-id': 'req-404' } })
  t.equal(res.status, 404)
  t.equal(res.headers['x-breakwater-error'], 'no_route')
  t.match(String(res.headers['content-type']), /^application\/json/)
  t.notOk('x-breakwater-mitigation' in res.headers, 'no mitigation caused it')
  const body = res.json<ErrorBody>()
  t.same(Object.keys(body).sort(), ['error', 'message', 'requestId'])
  t.equal(body.error, 'no_route')
  t.type(body.message, 'string')
  t.ok(body.message.length > 0, 'a message for humans')
  t.equal(body.requestId, 'req-404', 'the client\'s request id is echoed')
  t.equal(up.received.length, 0, 'nothing reached the upstream')

  const made = (await send(proxy, '/other')).json<ErrorBody>()
  t.match(made.requestId, /\S+/, 'a request id is made when the client sent none')
})

t.test('connect refused: 502 upstream_unavailable', async (t) => {
  const { proxy } = await startTestSidecar(t, oneRoute(await refusedUrl()))
  const res = await send(proxy, '/x')
  t.equal(res.status, 502)
  t.equal(res.headers['x-breakwater-error'], 'upstream_unavailable')
  t.equal(res.json<ErrorBody>().error, 'upstream_unavailable')
})

t.test('upstream resets the connection before answering: 502 upstream_unavailable', async (t) => {
  const up = await startUpstream(reset)
  t.teardown(up.close)
  const { proxy } = await startTestSidecar(t, oneRoute(up.url))
  const res = await send(proxy, '/x')
  t.equal(res.status, 502)
  t.equal(res.headers['x-breakwater-error'], 'upstream_unavailable')
  t.equal(res.json<ErrorBody>().error, 'upstream_unavailable')
  t.ok(up.received.length >= 1, 'the request did reach the upstream')
})

t.test('upstream slower than timeoutMs: 504 upstream_timeout, not before timeoutMs', async (t) => {
  const up = await startUpstream(hang)
  t.teardown(up.close)
  const { proxy } = await startTestSidecar(t, oneRoute(up.url, { timeoutMs: 200 }))
  const started = performance.now()
  const res = await send(proxy, '/slow')
  const took = performance.now() - started
  t.equal(res.status, 504)
  t.equal(res.headers['x-breakwater-error'], 'upstream_timeout')
  t.equal(res.json<ErrorBody>().error, 'upstream_timeout')
  t.ok(took >= 150, `not before the timeout (${Math.round(took)} ms); the upstream never answers, so only the timeout can end it`)
})

t.test('a sub-second timeoutMs ends the wait near its value, before a head that comes at 800 ms', async (t) => {
  // undici's own headersTimeout ticks in half-seconds: a 150 ms timeout fired after about a
  // second, so this 800 ms answer got through. The sweep checks it every 15 ms. Not a race on a
  // busy host: the upstream, the sidecar and the sweep share this process's timers, and a pass
  // that runs late judges at the time it was due, before the later timer that answers.
  const up = await startUpstream((_req, res) => {
    const timer = setTimeout(() => { res.writeHead(200, { 'content-type': 'text/plain' }); res.end('late') }, 800)
    res.on('close', () => { clearTimeout(timer) })
  })
  t.teardown(up.close)
  const { proxy } = await startTestSidecar(t, oneRoute(up.url, { timeoutMs: 150 }))
  const started = performance.now()
  const res = await send(proxy, '/slow')
  const took = performance.now() - started
  t.equal(res.status, 504, 'timed out, not the late 200')
  t.equal(res.headers['x-breakwater-error'], 'upstream_timeout')
  t.match(res.json<ErrorBody>().message, /150 ms/, 'the message names the route\'s timeout')
  t.ok(took >= 140, `not before the timeout (${Math.round(took)} ms)`)
})

t.test('a response body stalled for a sub-second idleTimeoutMs is cut near it, before the rest that comes at 800 ms', async (t) => {
  // undici's bodyTimeout ticks in half-seconds: a 150 ms idleTimeoutMs cut the body after
  // 0.5-1 s, so the rest often got through. The sweep checks the route every 15 ms. As above,
  // the upstream, the sidecar and the sweep share this process's timers.
  const up = await startUpstream((_req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '12' })
    res.write('part-')
    const timer = setTimeout(() => { res.end('of-it!!') }, 800)
    res.on('close', () => { clearTimeout(timer) })
  })
  t.teardown(up.close)
  const s = await startTestSidecar(t, oneRoute(up.url, { idleTimeoutMs: 150 }))
  const answer = await raw(s.proxyPort, 'GET /stall HTTP/1.1\r\nHost: x\r\n\r\n', 10_000)
  t.match(answer, /^HTTP\/1\.1 200 [^]*\r\n\r\npart-$/, 'the head and the part that came, then the connection closed')
  t.ok(await eventually(() => s.logs.some((l) => l.msg === 'request')), 'the request is logged')
  const line = s.logs.find((l) => l.msg === 'request') as Record<string, unknown>
  t.same([line.outcome, line['error.type']], ['upstream', 'upstream_timeout'], 'the upstream\'s failure, a timeout')
  t.equal(s.sidecar.dataPlane.stats.clientErrors.get('slow_client') ?? 0, 0, 'the client is not blamed')
})

t.test('a request head slower than listen.proxy.headersTimeoutMs: 408 request_timeout near it, before a 504 due at 3 s', async (t) => {
  // Node checks headersTimeout only every connectionsCheckingInterval (30 s by default): a
  // 300 ms limit answered its 408 about 30 s after the listener started, long after this 504.
  // Not a race on a busy host: the sidecar's checks and its sweep share this process's timers.
  const up = await startUpstream(hang)
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    ...oneRoute(up.url, { timeoutMs: 3000 }),
    listen: {
      proxy: { host: '127.0.0.1', port: 0, headersTimeoutMs: 300 },
      ops: { host: '127.0.0.1', port: 0 },
      admin: { host: '127.0.0.1', port: 0 }
    }
  })
  const slowHead = await WireClient.connect(s.proxyPort)
  t.teardown(() => { slowHead.destroy() })
  slowHead.write('GET /slow-head HTTP/1.1\r\nHost: x\r\n')
  let timedOut = false
  const reference = send(s.proxy, '/hangs').then((r) => { timedOut = true; return r })
  const res = await slowHead.response(60_000)
  t.equal(res.status, 408, 'the head did not arrive in time')
  t.notOk(timedOut, 'answered before the 504 due 3 s after the request')
  t.equal(res.headers['x-breakwater-error'], 'request_timeout')
  t.equal(JSON.parse(res.body).error, 'request_timeout', 'Breakwater\'s JSON body')
  await slowHead.until((c) => c.closed, 5000, 'the connection to close')
  t.equal(s.sidecar.dataPlane.stats.clientErrors.get('request_timeout'), 1, 'counted as a client error')
  t.equal((await reference).status, 504, 'the reference request timed out as configured')
})

t.test('a slow upload longer than timeoutMs is not a timeout: the clock starts when the request is fully sent', async (t) => {
  const up = await startUpstream((req, res, body) => {
    res.writeHead(200, { 'content-type': 'text/plain' })
    res.end(`got ${body.length}`)
  })
  t.teardown(up.close)
  const { proxy } = await startTestSidecar(t, oneRoute(up.url, { timeoutMs: 200 }))
  // 8 chunks, 120 ms apart: the upload takes about a second, five times the route's timeout.
  async function * slowly (): AsyncGenerator<Buffer> {
    for (let i = 0; i < 8; i++) {
      yield Buffer.alloc(1024, 120)
      await sleep(120)
    }
  }
  const started = performance.now()
  const res = await send(proxy, '/upload', { method: 'POST', body: Readable.from(slowly()) })
  const took = performance.now() - started
  t.ok(took > 600, `the upload really was slow (${Math.round(took)} ms)`)
  t.equal(res.status, 200, 'answered by the upstream, not a 504')
  t.equal(res.body, `got ${8 * 1024}`)
})

t.test('a failure after the response headers aborts the client connection', async (t) => {
  t.test('content-length response cut short', async (t) => {
    const up = await startUpstream(failMidBody)
    t.teardown(up.close)
    const { proxyPort, proxy } = await startTestSidecar(t, oneRoute(up.url))
    const client = await WireClient.connect(proxyPort)
    t.teardown(() => client.destroy())
    client.write('GET /partial HTTP/1.1\r\nHost: x\r\n\r\n')
    await client.until((c) => c.closed, 5000, 'the proxy to close the connection')
    t.match(client.received, /^HTTP\/1\.1 200 /, 'headers had been relayed')
    t.match(client.received, /content-length: 1000/i)
    const body = client.received.slice(client.received.indexOf('\r\n\r\n') + 4)
    t.ok(body.length < 1000, `the body is incomplete (${body.length} of 1000 bytes) and the connection closed`)
    // An HTTP client must see an error, never a clean short body.
    await t.rejects(send(proxy, '/partial'), 'a client sees an error')
  })

  t.test('chunked response cut short', async (t) => {
    const up = await startUpstream((_req, res) => {
      res.writeHead(200, { 'content-type': 'text/plain' }) // no content-length: chunked
      res.write('partial')
      setTimeout(() => res.socket?.destroy(), 20)
    })
    t.teardown(up.close)
    const { proxyPort, proxy } = await startTestSidecar(t, oneRoute(up.url))
    const client = await WireClient.connect(proxyPort)
    t.teardown(() => client.destroy())
    client.write('GET /partial HTTP/1.1\r\nHost: x\r\n\r\n')
    await client.until((c) => c.closed, 5000, 'the proxy to close the connection')
    t.match(client.received, /transfer-encoding: chunked/i)
    t.notMatch(client.received, /\r\n0\r\n\r\n$/, 'no terminating zero-length chunk: the body does not look complete')
    await t.rejects(send(proxy, '/partial'), 'a client sees an error')
  })
})

t.test('a client that goes away aborts its upstream request', async (t) => {
  t.test('while waiting for the response headers', async (t) => {
    let upstreamClosed = 0
    const up = await startUpstream((req, res) => {
      res.on('close', () => { upstreamClosed++ })
      hang(req, res, Buffer.alloc(0))
    })
    t.teardown(up.close)
    const { proxyPort, logs } = await startTestSidecar(t, oneRoute(up.url))
    const client = await WireClient.connect(proxyPort)
    client.write('GET /wait HTTP/1.1\r\nHost: x\r\n\r\n')
    t.ok(await eventually(() => up.received.length === 1, 5000), 'the upstream got the request')
    client.destroy()
    t.ok(await eventually(() => up.aborted === 1 && upstreamClosed === 1, 10_000), 'the upstream saw its request aborted')
    t.ok(await eventually(() => logs.some((l) => l.msg === 'request' && l['url.path'] === '/wait' && l['http.response.status_code'] === 499), 2000), 'logged as 499 (client closed request)')
  })

  t.test('while the response body streams', async (t) => {
    const up = await startUpstream((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream' })
      const timer = setInterval(() => res.write(Buffer.alloc(1024, 97)), 20)
      res.on('close', () => clearInterval(timer))
    })
    t.teardown(up.close)
    const { proxyPort } = await startTestSidecar(t, oneRoute(up.url))
    const client = await WireClient.connect(proxyPort)
    client.write('GET /stream HTTP/1.1\r\nHost: x\r\n\r\n')
    await client.until((c) => c.received.length > 4096, 5000, 'some of the body')
    client.destroy()
    t.ok(await eventually(() => up.aborted === 1, 1000), 'the upstream saw its response aborted within a second')
  })

  t.test('during a request body upload', async (t) => {
    let upstreamReqAborted = false
    const server = http.createServer((req) => {
      req.on('data', () => {})
      req.on('aborted', () => { upstreamReqAborted = true })
      req.on('error', () => {})
      req.socket.on('close', () => { upstreamReqAborted = true })
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    t.teardown(async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    })
    const port = (server.address() as { port: number }).port
    let seen = false
    server.on('request', () => { seen = true })
    const { proxyPort } = await startTestSidecar(t, oneRoute(`http://127.0.0.1:${port}`))
    const client = await WireClient.connect(proxyPort)
    client.write('POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n')
    client.write(Buffer.alloc(1000, 98))
    t.ok(await eventually(() => seen, 5000), 'the upstream got the request head')
    client.destroy()
    t.ok(await eventually(() => upstreamReqAborted, 1000), 'the upstream saw the upload aborted within a second')
  })
})

t.test('locally generated responses and their sockets: an error does not stop the next request', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const { proxy } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/api' }, upstream: 'app' }]
  })
  const client = new Client(proxy)
  t.teardown(async () => await client.close())
  const miss = await client.request({ path: '/nope', method: 'GET' })
  t.equal(miss.statusCode, 404)
  await miss.body.text()
  const hit = await client.request({ path: '/api/ok', method: 'GET' })
  t.equal(hit.statusCode, 200, 'the same keep-alive connection serves the next request')
  await hit.body.text()
})

t.test('README error table and ERRORS agree, both ways', async (t) => {
  const readme = readFileSync(resolve(ROOT, 'README.md'), 'utf8')
  const rows = new Map<string, { status: number, mitigation: string | null }>()
  for (const line of readme.split('\n')) {
    const m = /^\|\s*(\d{3})\s*\|\s*`([a-z_]+)`\s*\|\s*([^|]*?)\s*\|.*\|\s*$/.exec(line)
    if (m === null) continue
    const mitigationCell = m[3] as string
    const code = /`([^`]+)`/.exec(mitigationCell)
    t.notOk(rows.has(m[2] as string), `${m[2] as string} has one README row`)
    rows.set(m[2] as string, { status: Number(m[1]), mitigation: code === null ? null : code[1] as string })
  }
  t.ok(rows.size >= 5, `the README table was found (${rows.size} rows)`)
  for (const [code, spec] of Object.entries(ERRORS)) {
    const row = rows.get(code)
    t.ok(row, `README has a row for ${code}`)
    if (row === undefined) continue
    t.equal(row.status, spec.status, `${code}: README status matches ERRORS`)
    t.equal(row.mitigation, spec.mitigation, `${code}: README x-breakwater-mitigation matches ERRORS`)
  }
  for (const code of rows.keys()) t.ok(code in ERRORS, `README row ${code} exists in ERRORS`)
})
