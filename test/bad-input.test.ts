import t from 'tap'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar, oneRoute } from './helpers/sidecar.js'
import { send, raw, eventually } from './helpers/http.js'
import { parseResponse, type RawResponse } from './helpers/wire.js'
import { scrape, sumOf } from './helpers/metrics.js'

t.test('malformed requests are refused before reaching the upstream, and counted', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxy, proxyPort, ops } = await startTestSidecar(t, oneRoute(up.url))

  const still = async (what: string): Promise<void> => {
    const ok = await send(proxy, '/ok')
    t.equal(ok.status, 200, `after ${what}, the sidecar still serves a normal request`)
  }
  const refused = async (request: string | Buffer): Promise<RawResponse> => parseResponse(await raw(proxyPort, request))

  t.test('Content-Length and Transfer-Encoding together (request smuggling)', async (t) => {
    const before = up.received.length
    const res = await refused([
      'POST /smuggle HTTP/1.1',
      'Host: x',
      'Content-Length: 6',
      'Transfer-Encoding: chunked',
      '',
      '0',
      '',
      'GET /smuggled HTTP/1.1',
      'Host: x',
      '', ''
    ].join('\r\n'))
    t.equal(res.status, 400)
    t.equal(res.headers['x-breakwater-error'], 'bad_request')
    t.equal(JSON.parse(res.body).error, 'bad_request')
    t.match(res.headers['x-request-id'], /^\S+$/, 'a request id, though no request was read')
    t.equal(JSON.parse(res.body).requestId, res.headers['x-request-id'], 'the same in the body')
    t.match(res.headers.connection ?? '', /close/i, 'the connection is closed')
    t.equal(up.received.length, before, 'the upstream saw nothing, neither request')
    await still('a smuggling attempt')
  })

  t.test('Transfer-Encoding that is not chunked-last', async (t) => {
    const before = up.received.length
    const res = await refused('POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n')
    t.equal(res.status, 400)
    t.equal(up.received.length, before)
    await still('an invalid transfer coding')
  })

  t.test('two different Content-Length values', async (t) => {
    const before = up.received.length
    const res = await refused('POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde')
    t.equal(res.status, 400)
    t.equal(up.received.length, before)
  })

  t.test('headers larger than listen.proxy.maxHeaderSize (16 KB by default)', async (t) => {
    const before = up.received.length
    const res = await refused(`GET /big HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20 * 1024)}\r\n\r\n`)
    t.equal(res.status, 431)
    t.equal(res.headers['x-breakwater-error'], 'headers_too_large')
    t.match(JSON.parse(res.body).requestId, /^\S+$/, 'with a request id')
    t.equal(JSON.parse(res.body).error, 'headers_too_large')
    t.equal(up.received.length, before)
    await still('oversized headers')
    const fits = await send(proxy, '/fits', { headers: { 'x-big': 'a'.repeat(8 * 1024) } })
    t.equal(fits.status, 200, 'headers under the limit pass')
  })

  t.test('a garbage request line', async (t) => {
    const res = await refused('HELLO THERE\r\n\r\n')
    t.equal(res.status, 400)
    t.equal(res.headers['x-breakwater-error'], 'bad_request')
    const binary = await refused(Buffer.from([0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x0d, 0x0a, 0x0d, 0x0a]))
    t.equal(binary.status, 400, 'a TLS ClientHello on the plain port')
    await still('a garbage request line')
  })

  t.test('invalid characters in a header', async (t) => {
    const before = up.received.length
    const ctl = await refused('GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\u0001b\r\n\r\n')
    t.equal(ctl.status, 400, 'a control character in a value')
    const name = await refused('GET / HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n')
    t.equal(name.status, 400, 'a space in a header name')
    const lf = await refused('GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\nX-B: 2\r\n\r\n')
    t.equal(lf.status, 400, 'a bare LF line ending')
    t.equal(up.received.length, before)
    await still('invalid header characters')
  })

  t.test('breakwater_client_errors_total counts them by error', async (t) => {
    const samples = await scrape(ops)
    const bad = sumOf(samples, 'breakwater_client_errors_total', { error: 'bad_request' })
    t.equal(bad, 8, 'every bad_request above counted once')
    t.equal(sumOf(samples, 'breakwater_client_errors_total', { error: 'headers_too_large' }), 1, 'headers_too_large counted')
  })
})

t.test('maxHeaderSize is configurable', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxyPort, proxy } = await startTestSidecar(t, { ...oneRoute(up.url), listen: { proxy: { host: '127.0.0.1', port: 0, maxHeaderSize: 4096 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } } })
  const res = parseResponse(await raw(proxyPort, `GET / HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(6 * 1024)}\r\n\r\n`))
  t.equal(res.status, 431)
  t.equal((await send(proxy, '/ok')).status, 200)
})

t.test('every 400 of a request that cannot be forwarded is counted in breakwater_client_errors_total', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxy, proxyPort, ops } = await startTestSidecar(t, oneRoute(up.url))
  const refusals = [
    'GET /a%zz HTTP/1.1\r\nHost: x\r\n\r\n', // an invalid percent-encoding
    'GET /b HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n', // an upgrade other than WebSocket
    'GET /c HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n' // two Host fields
  ]
  for (const request of refusals) {
    const res = parseResponse(await raw(proxyPort, request))
    t.equal(res.status, 400, JSON.stringify(request.split('\r\n')[0]))
    t.equal(res.headers['x-breakwater-error'], 'bad_request')
  }
  t.equal(up.received.length, 0, 'the upstream saw none of them')
  const samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '400', source: 'breakwater' }), 3, 'each counted as our 400')
  t.equal(sumOf(samples, 'breakwater_client_errors_total', { error: 'bad_request' }), 3, 'and each as a client error, once')
  t.equal((await send(proxy, '/ok')).status, 200)
})

t.test('OPTIONS * (asterisk-form) is answered 200 by the sidecar itself; another method with * is still refused', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxyPort, ops, logs } = await startTestSidecar(t, oneRoute(up.url))
  // On one connection: the ping, then an ordinary request behind it (the connection lives on).
  const both = await raw(proxyPort, 'OPTIONS * HTTP/1.1\r\nHost: x\r\nx-request-id: ping-1\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  const ping = parseResponse(both)
  t.equal(ping.status, 200, 'RFC 9110 §9.3.7: a valid request, answered')
  t.equal(ping.headers['content-length'], '0', 'with an empty body')
  t.equal(ping.headers['x-request-id'], 'ping-1', 'and its request id')
  t.equal(ping.headers['x-breakwater-error'], undefined, 'not an error')
  const after = parseResponse(both.slice(both.indexOf('HTTP/1.1', 10)))
  t.equal(after.status, 200, 'the request behind it on the same connection is forwarded')
  t.same(up.received.map((r) => r.url), ['/after'], 'the upstream saw only that one')
  t.ok(await eventually(() => logs.some((l) => l.msg === 'request' && l.requestId === 'ping-1' && l.outcome === 'breakwater')), 'logged as the sidecar\'s answer')
  t.equal(sumOf(await scrape(ops), 'breakwater_requests_total', { code: '200', source: 'breakwater' }), 1, 'counted as the sidecar\'s answer')

  const get = parseResponse(await raw(proxyPort, 'GET * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'))
  t.equal(get.status, 400, 'GET * names no resource: refused')
})

t.test('OPTIONS http://host:port (absolute-form, no path) is the server-wide OPTIONS: answered by the sidecar as OPTIONS *; with a slash it asks about /', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxyPort, ops } = await startTestSidecar(t, oneRoute(up.url))
  const host = `127.0.0.1:${proxyPort}`
  // RFC 9112 §3.2.4: a proxy would pass it on as `OPTIONS *`, which undici cannot send; never as `OPTIONS /`.
  const server = parseResponse(await raw(proxyPort, `OPTIONS http://${host} HTTP/1.1\r\nHost: ${host}\r\nx-request-id: ping-abs\r\nConnection: close\r\n\r\n`))
  t.equal(server.status, 200, 'answered')
  t.equal(server.headers['content-length'], '0', 'with an empty body, as OPTIONS *')
  t.equal(server.headers['x-request-id'], 'ping-abs', 'and its request id')
  t.same(up.received.map((r) => r.url), [], 'not forwarded as OPTIONS /')
  t.equal(sumOf(await scrape(ops), 'breakwater_requests_total', { code: '200', source: 'breakwater' }), 1, 'counted as the sidecar\'s answer')

  const root = parseResponse(await raw(proxyPort, `OPTIONS http://${host}/ HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`))
  t.equal(root.status, 200)
  const query = parseResponse(await raw(proxyPort, `OPTIONS http://${host}?x=1 HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`))
  t.equal(query.status, 200)
  t.same(up.received.map((r) => `${r.method} ${r.url}`), ['OPTIONS /', 'OPTIONS /?x=1'], 'with a slash, or a query, it is an ordinary request for / and is forwarded')

  const other = parseResponse(await raw(proxyPort, `OPTIONS http://elsewhere:81 HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`))
  t.equal(other.status, 400, 'an authority that is not the Host is still refused')
})
