/**
 * Request smuggling, kept holding (SPEC §15): each variant of `helpers/smuggling.ts`, written
 * on a real socket, is either refused — 400, the connection closed, the upstream untouched —
 * or framed consistently: the upstream sees exactly the requests and bodies the client framed,
 * and the client gets one answer per request. No variant makes the two ends disagree.
 */
import t from 'tap'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar, oneRoute } from './helpers/sidecar.js'
import { WireClient, parseResponse } from './helpers/wire.js'
import { metricValue } from './helpers/metrics.js'
import { SMUGGLING_CASES } from './helpers/smuggling.js'

t.test('every smuggling variant is refused or framed as the client framed it', async (t) => {
  const seen: string[] = []
  const up = await startUpstream((req, res, body) => {
    seen.push(`${req.method ?? ''} ${req.url ?? ''} ${body.toString('latin1')}`)
    res.writeHead(200, { 'content-length': '2' })
    res.end('ok')
  })
  t.teardown(up.close)
  const s = await startTestSidecar(t, oneRoute(up.url))
  t.ok(SMUGGLING_CASES.length >= 49, `${SMUGGLING_CASES.length} variants`)
  for (const { name, bytes, verdict } of SMUGGLING_CASES) {
    seen.length = 0
    const c = await WireClient.connect(s.proxyPort)
    c.write(Buffer.from(bytes, 'latin1'))
    const statuses = (): string[] => [...c.received.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((m) => m[1] as string)
    if (verdict === 'refused') {
      await c.until((x) => x.closed, 5000, `${name}: the close`).catch(() => {})
      t.same(statuses(), ['400'], `${name}: 400`)
      t.ok(c.closed, `${name}: the connection is closed`)
      t.same(seen, [], `${name}: the upstream saw nothing`)
    } else {
      await c.until(() => statuses().length >= verdict.length && seen.length >= verdict.length, 5000, `${name}: the answers`).catch(() => {})
      t.same(seen, verdict, `${name}: the upstream saw exactly what the client framed`)
      t.same(statuses(), verdict.map(() => '200'), `${name}: one upstream answer per request`)
    }
    c.destroy()
  }
  t.equal(s.sidecar.dataPlane.circuit('app'), undefined, 'no breaker configured: nothing to move')
})

t.test('HTTP/2.0 or HTTP/0.9 on an HTTP/1 request line is refused as the client\'s doing, never forwarded as HTTP/1.1', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, oneRoute(up.url))
  for (const version of ['HTTP/2.0', 'HTTP/0.9']) {
    const c = await WireClient.connect(s.proxyPort)
    c.write(`GET /a ${version}\r\nHost: a\r\n\r\n`)
    await c.until((x) => x.closed, 5000, `${version}: the close`)
    const res = parseResponse(c.received)
    t.equal(res.status, 400, `${version}: 400 (SPEC §3: a malformed request)`)
    t.equal(res.headers['x-breakwater-error'], 'bad_request')
    t.match(JSON.parse(res.body), { error: 'bad_request', message: new RegExp(version.replace(/\./g, '\\.')) }, `${version}: the message names the version`)
    c.destroy()
  }
  t.same(up.received, [], 'the upstream saw nothing')
  t.equal(await metricValue(s.ops, 'breakwater_client_errors_total', { error: 'bad_request' }), 2, 'counted as client errors')
  const lines = s.logs.filter((l) => l.msg === 'request')
  t.same(lines.map((l) => `${String(l.outcome)}/${String(l['error.type'])}`), ['client/bad_request', 'client/bad_request'], 'each logged with outcome client')
})
