import t from 'tap'
import { startTestSidecar } from './helpers/sidecar.js'
import { refusedUrl, startUpstream } from './helpers/upstream.js'
import { raw, send, eventually, sleep } from './helpers/http.js'
import { WireClient, parseResponse } from './helpers/wire.js'
import { startWebSocketUpstream, handshakeRequest, acceptKey } from './helpers/websocket.js'
import { scrape, sumOf } from './helpers/metrics.js'

const KEY = 'dGhlIHNhbXBsZSBub25jZQ=='

function wsRoutes (url: string): Record<string, unknown> {
  return {
    upstreams: { ws: { url } },
    routes: [{ match: { pathPrefix: '/ws' }, upstream: 'ws' }]
  }
}

/** Bytes after the first response head. */
function afterHead (text: string): string {
  const end = text.indexOf('\r\n\r\n')
  return end === -1 ? '' : text.slice(end + 4)
}

t.test('a WebSocket handshake is tunnelled: 101, then bytes both ways', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, wsRoutes(up.url))
  const client = await WireClient.connect(proxyPort)
  t.teardown(() => client.destroy())
  client.write(handshakeRequest('/ws/chat?room=1', KEY))
  await client.until((c) => c.received.includes('\r\n\r\n'), 5000, 'the handshake response')
  const head = parseResponse(client.received)
  t.equal(head.status, 101)
  t.equal(head.headers.upgrade?.toLowerCase(), 'websocket')
  t.match(head.headers.connection ?? '', /upgrade/i)
  t.equal(head.headers['sec-websocket-accept'], acceptKey(KEY), 'the upstream\'s accept key is relayed')
  t.equal(head.headers['x-upstream'], 'ws')

  const seen = up.handshakes[0]
  t.ok(seen, 'the upstream got the handshake')
  t.equal(seen?.url, '/ws/chat?room=1')
  t.equal(seen?.headers.upgrade, 'websocket')
  t.match(String(seen?.headers.connection), /upgrade/i)
  t.equal(seen?.headers['sec-websocket-key'], KEY)
  t.equal(seen?.headers['sec-websocket-version'], '13')
  t.equal(seen?.headers['x-forwarded-for'], '127.0.0.1')
  t.ok(seen?.headers['x-request-id'], 'x-request-id added')

  client.write('hello upstream')
  await client.until((c) => afterHead(c.received).includes('hello upstream'), 5000, 'the echo')
  t.equal(up.received(), 'hello upstream', 'the upstream received the client\'s bytes')
  const binary = Buffer.from([0x81, 0x85, 0x00, 0xff, 0x0d, 0x0a, 0x00])
  client.write(binary)
  await client.until((c) => afterHead(c.received).endsWith(binary.toString('latin1')), 5000, 'binary echo')
  t.pass('arbitrary bytes pass both ways untouched')
})

t.test('the upstream can speak first', async (t) => {
  const up = await startWebSocketUpstream({ push: 'welcome' })
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, wsRoutes(up.url))
  const client = await WireClient.connect(proxyPort)
  t.teardown(() => client.destroy())
  client.write(handshakeRequest('/ws', KEY))
  await client.until((c) => afterHead(c.received) === 'welcome', 5000, 'the pushed bytes')
  t.equal(parseResponse(client.received).status, 101)
})

t.test('bytes sent right behind the handshake reach the upstream', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, wsRoutes(up.url))
  const client = await WireClient.connect(proxyPort)
  t.teardown(() => client.destroy())
  client.write(handshakeRequest('/ws', KEY) + 'early')
  await client.until((c) => afterHead(c.received).includes('early'), 5000, 'the echo of early bytes')
  t.equal(up.received(), 'early')
})

t.test('closing one side closes the other', async (t) => {
  t.test('client closes', async (t) => {
    const up = await startWebSocketUpstream()
    t.teardown(up.close)
    const { proxyPort, sidecar } = await startTestSidecar(t, wsRoutes(up.url))
    const client = await WireClient.connect(proxyPort)
    client.write(handshakeRequest('/ws', KEY))
    await client.until((c) => c.received.includes('\r\n\r\n'))
    t.ok(await eventually(() => up.sockets.length === 1, 2000))
    const upstreamSide = up.sockets[0]!
    let upstreamClosed = false
    upstreamSide.on('close', () => { upstreamClosed = true })
    client.destroy()
    t.ok(await eventually(() => upstreamClosed, 2000), 'the upstream socket closed')
    t.ok(await eventually(() => sidecar.dataPlane.tunnels.size === 0, 2000), 'the tunnel is gone')
  })

  t.test('upstream closes', async (t) => {
    const up = await startWebSocketUpstream()
    t.teardown(up.close)
    const { proxyPort, sidecar } = await startTestSidecar(t, wsRoutes(up.url))
    const client = await WireClient.connect(proxyPort)
    t.teardown(() => client.destroy())
    client.write(handshakeRequest('/ws', KEY))
    await client.until((c) => c.received.includes('\r\n\r\n'))
    t.ok(await eventually(() => up.sockets.length === 1, 2000))
    up.sockets[0]!.end('bye')
    await client.until((c) => c.closed, 2000, 'the client socket to close')
    t.equal(afterHead(client.received), 'bye', 'the last bytes arrived before the close')
    t.ok(await eventually(() => sidecar.dataPlane.tunnels.size === 0, 2000), 'the tunnel is gone')
  })
})

t.test('a tunnel counts in the duration histogram with its handshake, not with how long it stays open', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const { proxyPort, ops, sidecar } = await startTestSidecar(t, wsRoutes(up.url))
  const client = await WireClient.connect(proxyPort)
  t.teardown(() => client.destroy())
  const sent = performance.now()
  client.write(handshakeRequest('/ws', KEY))
  await client.until((c) => c.received.includes('\r\n\r\n'), 5000, 'the handshake response')
  // The sidecar's time to the 101 lies inside the client's.
  const handshakeSeconds = (performance.now() - sent) / 1000
  await sleep(1200)
  client.destroy()
  t.ok(await eventually(() => sidecar.dataPlane.tunnels.size === 0, 5000), 'the tunnel is gone')
  const metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_request_duration_seconds_count\{route="ws",upstream="ws"\} 1\n/, 'the handshake is one observation')
  const sum = Number(/breakwater_request_duration_seconds_sum\{route="ws",upstream="ws"\} (\S+)/.exec(metrics)?.[1])
  t.ok(sum > 0 && sum <= handshakeSeconds, `observed ${sum} s, within the handshake's ${handshakeSeconds} s (the tunnel stayed open over 1.2 s)`)
})

t.test('an upstream refusing the upgrade: its response is relayed', async (t) => {
  const up = await startWebSocketUpstream({ refuse: 403 })
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, wsRoutes(up.url))
  const res = parseResponse(await raw(proxyPort, handshakeRequest('/ws', KEY)))
  t.equal(res.status, 403)
  t.equal(res.headers['x-refused-by'], 'upstream')
  t.equal(res.body, 'upgrade refused')
  t.notOk('upgrade' in res.headers, 'no upgrade header on a refusal')
})

t.test('an upstream refusing the upgrade: hop-by-hop headers of its refusal are removed, as on any response', async (t) => {
  const up = await startWebSocketUpstream({
    refuse: 403,
    refuseHeaders: ['Connection: x-hop', 'X-Hop: secret', 'Keep-Alive: timeout=3', 'Proxy-Connection: keep-alive', 'TE: trailers', 'Trailer: x-sum', 'Upgrade: websocket', 'X-Kept: 1']
  })
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, wsRoutes(up.url))
  const res = parseResponse(await raw(proxyPort, handshakeRequest('/ws', KEY)))
  t.equal(res.status, 403)
  t.equal(res.body, 'upgrade refused')
  t.equal(res.headers['x-kept'], '1')
  for (const h of ['x-hop', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'upgrade']) t.notOk(h in res.headers, `${h} removed`)
  t.equal(res.headers.connection, 'close', 'only the sidecar\'s own Connection')
})

t.test('an upstream refusing the upgrade with a 204 or 304 that carries a Content-Length: it ends at its head and is relayed', async (t) => {
  for (const status of [204, 304]) {
    t.test(String(status), async (t) => {
      const up = await startWebSocketUpstream({ refuse: status, bodiless: true })
      t.teardown(up.close)
      const s = await startTestSidecar(t, wsRoutes(up.url))
      const client = await WireClient.connect(s.proxyPort)
      t.teardown(() => client.destroy())
      client.write(handshakeRequest('/ws', KEY))
      await client.until((c) => c.closed, 5000, 'the sidecar closes the connection')
      const res = parseResponse(client.received)
      t.equal(res.status, status, 'the refusal is relayed')
      t.equal(res.headers['x-refused-by'], 'upstream')
      t.equal(res.body, '', 'with no body')
      t.equal(client.error, null, 'ended, not reset')
      await eventually(() => s.logs.some((l) => l.msg === 'request'))
      const line = s.logs.find((l) => l.msg === 'request')
      t.equal(line?.['http.response.status_code'], status)
      t.equal(line?.outcome, 'ok', 'the upstream answered: its outcome is ok')
      t.equal(line?.['error.type'], undefined, 'no error')
      const samples = await scrape(s.ops)
      t.equal(sumOf(samples, 'breakwater_requests_total', { code: String(status), source: 'upstream' }), 1, 'counted once, as the upstream\'s status')
      t.equal(sumOf(samples, 'breakwater_responses_cut_total'), 0, 'not counted as a response cut')
    })
  }
})

t.test('an interim 103 before the upstream\'s 101 is passed over: the client gets the 101 and the tunnel', async (t) => {
  const up = await startWebSocketUpstream({ interim: 'HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload\r\n\r\n' })
  t.teardown(up.close)
  const s = await startTestSidecar(t, wsRoutes(up.url))
  const client = await WireClient.connect(s.proxyPort)
  t.teardown(() => client.destroy())
  client.write(handshakeRequest('/ws', KEY))
  await client.until((c) => c.received.includes('\r\n\r\n'), 5000, 'the handshake response')
  t.equal(parseResponse(client.received).status, 101, 'the first head the client reads is the 101')
  client.write('ping')
  await client.until((c) => afterHead(c.received).includes('ping'), 5000, 'the echo')
  await eventually(() => s.logs.some((l) => l.msg === 'request'))
  t.same(s.logs.filter((l) => l.msg === 'request').map((l) => l['http.response.status_code']), [101], 'logged as the 101 it was')
})

t.test('a non-WebSocket upgrade (h2c) is refused with 400', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, wsRoutes(up.url))
  const res = parseResponse(await raw(proxyPort, [
    'GET /ws HTTP/1.1',
    'Host: x',
    'Connection: Upgrade, HTTP2-Settings',
    'Upgrade: h2c',
    'HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA',
    '', ''
  ].join('\r\n')))
  t.equal(res.status, 400)
  t.equal(res.headers['x-breakwater-error'], 'bad_request')
  t.equal(JSON.parse(res.body).error, 'bad_request')
  t.equal(up.handshakes.length + up.plainRequests, 0, 'nothing reached the upstream')
})

t.test('a WebSocket handshake with two Host headers is refused with 400, like any request', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, wsRoutes(up.url))
  const res = parseResponse(await raw(proxyPort, handshakeRequest('/ws', KEY, ['Host: other.example'])))
  t.equal(res.status, 400)
  t.equal(res.headers['x-breakwater-error'], 'bad_request')
  t.match(JSON.parse(res.body).message, /more than one Host/)
  t.equal(up.handshakes.length + up.plainRequests, 0, 'nothing reached the upstream')
})

t.test('a WebSocket handshake to an unmatched path gets 404 no_route', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, wsRoutes(up.url))
  const res = parseResponse(await raw(proxyPort, handshakeRequest('/elsewhere', KEY)))
  t.equal(res.status, 404)
  t.equal(res.headers['x-breakwater-error'], 'no_route')
  t.equal(JSON.parse(res.body).error, 'no_route')
  t.equal(up.handshakes.length, 0)
})

t.test('the upgrade path is normalised like any other', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, wsRoutes(up.url))
  const client = await WireClient.connect(proxyPort)
  t.teardown(() => client.destroy())
  client.write(handshakeRequest('/x/../%77s//chat', KEY))
  await client.until((c) => c.received.includes('\r\n\r\n'))
  t.equal(parseResponse(client.received).status, 101)
  t.equal(up.handshakes[0]?.url, '/ws/chat', 'the normalised path is forwarded')
  const bad = parseResponse(await raw(proxyPort, handshakeRequest('/ws/%zz', KEY)))
  t.equal(bad.status, 400, 'an invalid encoding is refused')
})

t.test('a WebSocket handshake to an upstream that refuses connections gets 502', async (t) => {
  const { proxyPort } = await startTestSidecar(t, wsRoutes(await refusedUrl()))
  const res = parseResponse(await raw(proxyPort, handshakeRequest('/ws', KEY)))
  t.equal(res.status, 502)
  t.equal(res.headers['x-breakwater-error'], 'upstream_unavailable')
})

t.test('a WebSocket handshake to a route whose kill switch is off is refused, like any request', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const { proxyPort, proxy } = await startTestSidecar(t, {
    upstreams: { ws: { url: up.url } },
    routes: [{ match: { pathPrefix: '/ws' }, upstream: 'ws', killSwitch: 'enableChat' }],
    featureFlags: { enableChat: false }
  })
  const plain = await send(proxy, '/ws')
  t.equal(plain.status, 503, 'a plain request to the route is refused')
  t.equal(plain.headers['x-breakwater-error'], 'feature_disabled')
  const res = parseResponse(await raw(proxyPort, handshakeRequest('/ws', KEY)))
  t.equal(res.status, 503, 'the handshake is refused too: an upgrade does not bypass a kill switch')
  t.equal(res.headers['x-breakwater-error'], 'feature_disabled')
  t.equal(res.headers['x-breakwater-mitigation'], 'kill-switch')
  t.equal(up.handshakes.length, 0, 'the upstream saw no handshake')
})

t.test('a WebSocket handshake to an upstream whose circuit is open is refused, like any request', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  // The upstream answers plain requests 426; counted as failures here, two open the circuit.
  const { proxyPort, proxy } = await startTestSidecar(t, {
    upstreams: { ws: { url: up.url } },
    routes: [{ match: { pathPrefix: '/ws' }, upstream: 'ws' }],
    circuitBreakers: { ws: { volumeThreshold: 2, failureThreshold: 0.5, failureStatuses: [426], recoveryTimeout: 60000 } }
  })
  for (let i = 0; i < 2; i++) t.equal((await send(proxy, '/ws')).status, 426)
  const plain = await send(proxy, '/ws')
  t.equal(plain.headers['x-breakwater-error'], 'circuit_open', 'the circuit is open for plain requests')
  const res = parseResponse(await raw(proxyPort, handshakeRequest('/ws', KEY)))
  t.equal(res.status, 503, 'the handshake is refused too')
  t.equal(res.headers['x-breakwater-error'], 'circuit_open')
  t.equal(up.handshakes.length, 0, 'the upstream saw no handshake')
})

t.test('a handshake pipelined behind a request still being answered waits for that answer', async (t) => {
  const ws = await startWebSocketUpstream()
  t.teardown(ws.close)
  // The plain request's answer waits here until the test lets it go.
  const held: Array<() => void> = []
  const plain = await startUpstream((req, res) => {
    // `/unframed`: no length, so the answer can only end with the connection (to HTTP/1.0).
    const headers = req.url === '/unframed' ? { 'content-type': 'text/plain' } : { 'content-type': 'text/plain', 'content-length': '5' }
    held.push(() => { res.writeHead(200, headers); res.end('first') })
  })
  t.teardown(plain.close)
  const { proxyPort } = await startTestSidecar(t, {
    upstreams: { ws: { url: ws.url }, plain: { url: plain.url } },
    routes: [{ match: { pathPrefix: '/ws' }, upstream: 'ws' }, { match: { pathPrefix: '/' }, upstream: 'plain' }]
  })

  t.test('its answer comes first, then the 101', async (t) => {
    const client = await WireClient.connect(proxyPort)
    t.teardown(() => client.destroy())
    client.write('GET /first HTTP/1.1\r\nHost: x\r\n\r\n' + handshakeRequest('/ws', KEY) + 'early')
    t.ok(await eventually(() => held.length === 1, 10_000), 'the first request reached its upstream')
    // Given the time to jump the queue, the handshake must not have.
    await sleep(200)
    t.equal(ws.handshakes.length, 0, 'the handshake is not forwarded while the answer before it is due')
    ;(held.shift() as () => void)()
    await client.until((c) => c.received.includes('early'), 10_000, 'the echo of the early bytes')
    const first = client.received.indexOf('HTTP/1.1 200')
    const upgraded = client.received.indexOf('HTTP/1.1 101')
    t.ok(first === 0 && upgraded > first, 'the 200 whole, then the 101')
    t.ok(client.received.slice(0, upgraded).endsWith('first'), 'the first answer\'s body before the 101')
    t.equal(ws.handshakes.length, 1, 'then the upstream got the handshake')
    t.equal(ws.received(), 'early', 'and the bytes behind it')
  })

  t.test('an answer that ends the connection: the handshake is never forwarded', async (t) => {
    const client = await WireClient.connect(proxyPort)
    t.teardown(() => client.destroy())
    const before = ws.handshakes.length
    // An HTTP/1.0 client asks for keep-alive, but the answer has no length: it can only be
    // delimited by closing the connection, so the handshake after it is not a request.
    client.write('GET /unframed HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n' + handshakeRequest('/ws', KEY))
    t.ok(await eventually(() => held.length === 1, 10_000), 'the first request reached its upstream')
    ;(held.shift() as () => void)()
    await client.until((c) => c.closed, 10_000, 'the connection closed')
    t.match(client.received, /^HTTP\/1\.1 200 [^]*first$/, 'only the first answer')
    await sleep(200)
    t.equal(ws.handshakes.length, before, 'the upstream saw no handshake')
  })
})
