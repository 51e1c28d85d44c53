import t from 'tap'
import { startUpstream, delay, echo } from './helpers/upstream.js'
import { startTestSidecar, oneRoute } from './helpers/sidecar.js'
import { send, raw, eventually, type Reply } from './helpers/http.js'
import { WireClient, parseResponse } from './helpers/wire.js'
import { scrape, sumOf } from './helpers/metrics.js'

t.test('limits.maxInFlight: the request over the limit gets 503 overloaded at once', async (t) => {
  const up = await startUpstream(delay(3000))
  t.teardown(up.close)
  const { proxy, ops } = await startTestSidecar(t, { ...oneRoute(up.url), limits: { maxInFlight: 2 } })
  const slow: Array<Promise<Reply>> = [send(proxy, '/slow/1'), send(proxy, '/slow/2')]
  let settled = 0
  for (const p of slow) void p.then(() => { settled++ }, () => { settled++ })
  t.ok(await eventually(() => up.received.length === 2, 10_000), 'two requests in flight')
  const third = await send(proxy, '/third')
  t.equal(third.status, 503)
  t.equal(third.headers['x-breakwater-error'], 'overloaded')
  t.equal(third.json<{ error: string }>().error, 'overloaded')
  t.equal(third.headers['x-breakwater-mitigation'], undefined, 'overload is not a mitigation')
  t.equal(settled, 0, 'refused while both requests in flight still waited: at once, not queued behind them')
  t.equal(up.received.length, 2, 'the refused request never reached the upstream')
  const samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_overloaded_total', { reason: 'max_in_flight' }), 1, 'breakwater_overloaded_total{reason="max_in_flight"}')
  for (const r of await Promise.all(slow)) t.equal(r.status, 200, 'the requests in flight complete')
  t.equal((await send(proxy, '/after')).status, 200, 'below the limit again: served')
})

t.test('limits.maxConnections: a connection over the limit gets 503 overloaded', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const { proxyPort, ops } = await startTestSidecar(t, { ...oneRoute(up.url), limits: { maxConnections: 2 } })
  const open: WireClient[] = []
  t.teardown(() => { for (const c of open) c.destroy() })
  for (let i = 0; i < 2; i++) {
    const c = await WireClient.connect(proxyPort)
    open.push(c)
    c.write('GET /keep HTTP/1.1\r\nHost: x\r\n\r\n')
    t.equal((await c.response()).status, 200, `connection ${i + 1} is served and kept alive`)
  }
  const res = parseResponse(await raw(proxyPort, 'GET /third HTTP/1.1\r\nHost: x\r\n\r\n'))
  t.equal(res.status, 503)
  t.equal(res.headers['x-breakwater-error'], 'overloaded')
  t.equal(JSON.parse(res.body).error, 'overloaded')
  t.equal(up.received.length, 2, 'the third connection\'s request never reached the upstream')
  t.equal(sumOf(await scrape(ops), 'breakwater_overloaded_total', { reason: 'max_connections' }), 1, 'breakwater_overloaded_total{reason="max_connections"}')

  open.pop()?.destroy()
  let served = false
  t.ok(await eventually(async () => {
    const again = parseResponse(await raw(proxyPort, 'GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'))
    served = again.status === 200
    return served
  }, 3000, 100), 'once a connection closes, a new one is served')
})

t.test('event-loop delay over limits.maxEventLoopDelayMs sheds requests with 503 overloaded', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const { proxyPort, ops } = await startTestSidecar(t, { ...oneRoute(up.url), limits: { maxEventLoopDelayMs: 200 } })
  // The sidecar runs in this process, so blocking this event loop blocks the sidecar's.
  // Sequence: an established keep-alive connection; the request bytes written to it (they
  // sit in the kernel); a 1.5 s busy loop started from the check phase. The next loop
  // iteration runs timers before I/O: the delay monitor measures the stall first, then the
  // request is read and must be shed.
  // On a starved host this process's own loop can lag past the limit before the stall: the
  // warm-up is sent again, on a new connection, until one is served.
  const overloaded = async (): Promise<number> => sumOf(await scrape(ops), 'breakwater_overloaded_total', { reason: 'event_loop_delay' })
  const clients: WireClient[] = []
  t.teardown(() => { for (const c of clients) c.destroy() })
  t.ok(await eventually(async () => {
    const c = await WireClient.connect(proxyPort)
    clients.unshift(c)
    c.write('GET /warm HTTP/1.1\r\nHost: x\r\n\r\n')
    return (await c.response()).status === 200
  }, 15_000, 100), 'served before the stall')
  const shedBefore = await overloaded()
  const client = clients[0] as WireClient
  client.received = ''
  await new Promise<void>((resolve) => setImmediate(resolve))
  client.write('GET /during HTTP/1.1\r\nHost: x\r\n\r\n')
  const until = performance.now() + 1500
  while (performance.now() < until) { /* block the event loop */ }
  const shed = await client.response()
  t.equal(shed.status, 503, 'the request read right after the stall is shed')
  t.equal(shed.headers['x-breakwater-error'], 'overloaded')
  t.equal(up.received.filter((r) => r.url === '/during').length, 0, 'it never reached the upstream')
  t.equal(await overloaded() - shedBefore, 1, 'breakwater_overloaded_total{reason="event_loop_delay"} counts it')
  t.ok(await eventually(async () => (await send(`http://127.0.0.1:${proxyPort}`, '/after')).status === 200, 3000, 50), 'served again once the loop keeps up')
})
