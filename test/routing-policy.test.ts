import t from 'tap'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { raw } from './helpers/http.js'
import { parseResponse, type RawResponse } from './helpers/wire.js'
import { admin } from './helpers/admin.js'
import { handshakeRequest } from './helpers/websocket.js'
import { resolveConfig, ConfigError } from '../src/config/load.js'

/** One request written byte for byte (HTTP clients would normalise `#`, `\` and case). */
async function ask (port: number, method: string, target: string, host = 'app.example'): Promise<RawResponse> {
  const length = method === 'PUT' || method === 'POST' ? 'Content-Length: 0\r\n' : ''
  return parseResponse(await raw(port, `${method} ${target} HTTP/1.1\r\nHost: ${host}\r\n${length}Connection: close\r\n\r\n`))
}

const portOf = (url: string): number => Number(new URL(url).port)

/** The README's own example: a kill switch on `/checkout` for GET and POST, before a catch-all. */
const readmeRoutes = (url: string): Record<string, unknown> => ({
  upstreams: { app: { url } },
  routes: [
    { name: 'checkout', match: { pathPrefix: '/checkout', methods: ['GET', 'POST'] }, upstream: 'app', killSwitch: 'enableNewCheckout' },
    { name: 'pay', match: { path: '/pay' }, upstream: 'app', killSwitch: 'enablePay' },
    { match: { pathPrefix: '/' }, upstream: 'app' }
  ],
  featureFlags: { enableNewCheckout: false, enablePay: false }
})

/** Spellings and methods the app treats as a killed path. */
const KILLED: Array<[string, string]> = [
  ['GET', '/CHECKOUT'],
  ['GET', '/Checkout/cart'],
  ['GET', '/pay/'],
  ['GET', '/pay;jsessionid=1'],
  ['GET', '/PAY;jsessionid=1/'],
  ['GET', '/x/..;/checkout'],
  ['HEAD', '/checkout'],
  ['PUT', '/checkout'],
  ['DELETE', '/checkout'],
  ['DELETE', '/Checkout/'],
  ['POST', '/checkout']
]

/** Targets no app may see: refused with 400 before routing, whatever the flags. */
const REFUSED = ['/pay#x', '/checkout#', '/x\\..\\checkout', '/checkout\\']

t.test('a kill switch guards every spelling and every method of its path; nothing reaches the app', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxyPort, admin: adminUrl } = await startTestSidecar(t, readmeRoutes(up.url))

  for (const [method, target] of KILLED) {
    const res = await ask(proxyPort, method, target)
    t.equal(res.status, 503, `${method} ${target} refused`)
    t.equal(res.headers['x-breakwater-error'], 'feature_disabled', `${method} ${target}: feature_disabled`)
    t.equal(res.headers['x-breakwater-mitigation'], 'kill-switch')
  }
  for (const target of REFUSED) {
    const res = await ask(proxyPort, 'GET', target)
    t.equal(res.status, 400, `GET ${target} refused`)
    t.equal(res.headers['x-breakwater-error'], 'bad_request')
  }
  t.equal(up.received.length, 0, 'the upstream saw no request while the flags were off')

  for (const flag of ['enableNewCheckout', 'enablePay']) {
    t.equal((await admin(adminUrl, 'PUT', `/v1/flags/${flag}`, { enabled: true, reason: 'feature fixed' })).status, 200)
  }
  for (const [method, target] of KILLED) {
    const before = up.received.length
    const res = await ask(proxyPort, method, target)
    t.equal(res.status, 200, `${method} ${target} reaches the app with the flag on`)
    t.equal(up.received.length, before + 1)
    const seen = up.received.at(-1)
    t.same({ method: seen?.method, url: seen?.url }, { method, url: target }, 'forwarded as the client spelled it (never lower-cased)')
  }
  for (const target of REFUSED) t.equal((await ask(proxyPort, 'GET', target)).status, 400, `GET ${target} is refused with the flag on too`)
  t.equal(up.received.length, KILLED.length, 'refused targets never reached the app')
})

t.test('a live route lets other methods fall through to later routes; a killed one claims them', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxyPort, ops, admin: adminUrl } = await startTestSidecar(t, {
    ...readmeRoutes(up.url),
    featureFlags: { enableNewCheckout: true, enablePay: true }
  })
  t.equal((await ask(proxyPort, 'DELETE', '/checkout')).status, 200)
  let metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_requests_total\{route="root",upstream="app",code="200"[^}]*\} 1/, 'DELETE went to the catch-all while the feature was live')

  await admin(adminUrl, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'regression' })
  const res = await ask(proxyPort, 'DELETE', '/checkout')
  t.equal(res.headers['x-breakwater-error'], 'feature_disabled')
  metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_rejections_total\{route="checkout",reason="kill_switch"\} 1/, 'counted on the killed route')
  t.equal((await ask(proxyPort, 'GET', '/other')).status, 200, 'other paths are untouched')
  t.equal(up.received.length, 2)
})

t.test('a killed route claims its path spelled with encoded slashes; a live one leaves that spelling to the routes after it', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxyPort, ops, admin: adminUrl } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout/' }, upstream: 'app', killSwitch: 'enableNewCheckout' },
      { name: 'pay', match: { path: '/pay' }, upstream: 'app', killSwitch: 'enablePay' },
      { name: 'admin', match: { pathPrefix: '/admin/', strict: true }, upstream: 'app', killSwitch: 'enableAdmin' },
      { match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { enableNewCheckout: false, enablePay: false, enableAdmin: false }
  })
  // What a WSGI app (PATH_INFO) or Go's URL.Path sees: %2F decoded to /.
  const killed = ['/checkout%2Fcart', '/Checkout%2fcart', '/pay%2F', '/x%2F..%2Fpay', '/checkout%2F%2Fcart?x=1']
  for (const target of killed) {
    const res = await ask(proxyPort, 'GET', target)
    t.equal(res.status, 503, `GET ${target} refused`)
    t.equal(res.headers['x-breakwater-error'], 'feature_disabled')
  }
  t.equal(up.received.length, 0, 'no encoded-slash spelling reached the killed features')
  t.equal((await ask(proxyPort, 'GET', '/admin%2Fusers')).status, 200, 'a strict route matches only its spelling, as documented')
  t.equal((await ask(proxyPort, 'GET', '/files/a%2Fb')).status, 200, 'an encoded slash elsewhere is untouched')
  let metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_rejections_total\{route="checkout",reason="kill_switch"\} 3/, 'counted on the killed route')

  for (const flag of ['enableNewCheckout', 'enablePay']) {
    t.equal((await admin(adminUrl, 'PUT', `/v1/flags/${flag}`, { enabled: true, reason: 'feature fixed' })).status, 200)
  }
  for (const target of killed) t.equal((await ask(proxyPort, 'GET', target)).status, 200, `GET ${target} reaches the app with the flag on`)
  t.same(up.received.slice(2).map((r) => r.url), killed.map((k) => k.replace('%2f', '%2F')), 'forwarded as spelled, escapes upper-cased by the normalisation')
  metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_requests_total\{route="root",upstream="app",code="200"[^}]*\} 7/, 'routing of a live route is unchanged: %2F is data, so the catch-all served them')
})

t.test('match.strict: only the spelling as written is matched, and validate warns about its kill switch', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const input = {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'legacy', match: { path: '/Legacy', strict: true }, upstream: 'app', killSwitch: 'enableLegacy' },
      { match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { enableLegacy: false }
  }
  const { warnings } = resolveConfig({ service: 's', ...input })
  t.ok(warnings.some((w) => w.startsWith('routes[0].match.strict: the kill switch "enableLegacy"')), warnings.join('\n'))

  const { proxyPort } = await startTestSidecar(t, input)
  t.equal((await ask(proxyPort, 'GET', '/Legacy')).headers['x-breakwater-error'], 'feature_disabled')
  t.equal((await ask(proxyPort, 'GET', '/Legacy?q=1')).headers['x-breakwater-error'], 'feature_disabled', 'the query never counts')
  for (const target of ['/legacy', '/Legacy/', '/Legacy;x=1']) {
    t.equal((await ask(proxyPort, 'GET', target)).status, 200, `${target} is another path to a strict route`)
  }
  t.equal(up.received.length, 3)
})

t.test('ingress and egress are separate listeners', async (t) => {
  const app = await startUpstream()
  t.teardown(app.close)
  const payments = await startUpstream()
  t.teardown(payments.close)
  const local = { host: '127.0.0.1', port: 0 }
  const { sidecar, proxyPort } = await startTestSidecar(t, {
    listen: { proxy: local, egress: local, ops: local, admin: local },
    upstreams: { app: { url: app.url }, payments: { url: payments.url } },
    routes: [
      { name: 'payments', listener: 'egress', match: { pathPrefix: '/', host: 'payments.local' }, upstream: 'payments' },
      { name: 'api', match: { pathPrefix: '/api' }, upstream: 'app' }
    ]
  })
  const egressPort = portOf(sidecar.addresses.egress as string)

  for (const host of ['payments.local', 'PAYMENTS.local:80', `127.0.0.1:${egressPort}`, 'app.example']) {
    const res = await ask(proxyPort, 'GET', '/charge', host)
    t.equal(res.status, 404, `proxy port, Host ${host}: no route`)
    t.equal(res.headers['x-breakwater-error'], 'no_route')
  }
  const upgrade = parseResponse(await raw(proxyPort, handshakeRequest('/charge', 'dGhlIHNhbXBsZSBub25jZQ==').replace('Host: ws.example', 'Host: payments.local')))
  t.equal(upgrade.status, 404, 'a WebSocket handshake on the proxy port does not reach the egress route either')
  t.equal(payments.received.length, 0, 'the egress upstream was never reached from the proxy port')

  const out = await ask(egressPort, 'GET', '/charge', 'payments.local')
  t.equal(out.status, 200, 'the egress port reaches the egress route')
  t.equal(payments.received.length, 1)
  t.equal((await ask(egressPort, 'GET', '/api/x', 'app.example')).status, 404, 'the egress port reaches no proxy route')
  t.equal((await ask(proxyPort, 'GET', '/api/x')).status, 200, 'the proxy port still reaches its own routes')
  t.equal(app.received.length, 1)
})

function problemsOf (input: Record<string, unknown>): readonly string[] {
  try {
    resolveConfig({ service: 's', upstreams: { a: { url: 'http://127.0.0.1:1' } }, ...input })
  } catch (err) {
    if (err instanceof ConfigError) return err.problems
    throw err
  }
  return []
}

t.test('validate: routing footguns are named by key', async (t) => {
  t.same(problemsOf({ routes: [{ listener: 'egress', match: { pathPrefix: '/' }, upstream: 'a' }] }),
    ['routes[0].listener: "egress" needs listen.egress (the listener the app sends its own outbound calls to)'])
  t.match(problemsOf({ routes: [{ listener: 'outbound', match: { pathPrefix: '/' }, upstream: 'a' }] }), [/^routes\[0\]\.listener: must be one of "proxy", "egress"/])
  t.match(problemsOf({ routes: [{ match: { pathPrefix: '/', strict: 'yes' }, upstream: 'a' }] }), [/^routes\[0\]\.match\.strict: must be true or false/])
  t.same(problemsOf({
    listen: { egress: { port: 0 } },
    routes: [{ name: 'out', listener: 'egress', match: { pathPrefix: '/' }, upstream: 'a' }, { match: { pathPrefix: '/' }, upstream: 'a' }],
    verification: { synthetics: [{ path: '/', route: 'out' }] }
  }), ['verification.synthetics[0].route: "out" is an egress route; synthetic checks go through the proxy listener'])

  const warned = (input: Record<string, unknown>): string[] => resolveConfig({ service: 's', upstreams: { a: { url: 'http://127.0.0.1:1' } }, ...input }).warnings
  t.ok(warned({ listen: { egress: { port: 0 } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'a' }] })
    .includes('listen.egress: no route has listener: egress, so every request on the egress listener is 404 no_route'))
  const split = warned({
    routes: [
      { match: { pathPrefix: '/orders', methods: ['GET'] }, upstream: 'a', killSwitch: 'newOrders' },
      { match: { pathPrefix: '/Orders/', methods: ['POST'] }, upstream: 'a' },
      { match: { pathPrefix: '/' }, upstream: 'a' }
    ],
    featureFlags: { newOrders: true }
  })
  t.same(split.filter((w) => w.startsWith('routes[')),
    ['routes[1]: while flag "newOrders" is off, routes[0] refuses every method on its paths, including this route\'s requests (a killed route guards its path whatever the method)'],
    'a route split by method behind a kill switch is pointed out; the catch-all is not')
  t.same(warned(readmeRoutes('http://127.0.0.1:1')).filter((w) => w.startsWith('routes')), [], 'the README example is clean')
})

t.test("a host-matched kill switch covers the host's fully qualified spelling (a final dot)", async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxyPort } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'pay', match: { pathPrefix: '/pay', host: 'pay.local' }, upstream: 'app', killSwitch: 'enablePay' },
      { name: 'dotted', match: { pathPrefix: '/', host: 'shop.local.:8080' }, upstream: 'app', killSwitch: 'enableShop' },
      { match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { enablePay: false, enableShop: false }
  })
  for (const host of ['pay.local', 'PAY.LOCAL', 'pay.local:8080', 'pay.local.', 'Pay.Local.:8080']) {
    const res = await ask(proxyPort, 'GET', '/pay', host)
    t.equal(res.headers['x-breakwater-error'], 'feature_disabled', `Host ${host}: refused by the kill switch`)
  }
  for (const host of ['shop.local:8080', 'shop.local.:8080']) {
    const res = await ask(proxyPort, 'GET', '/', host)
    t.equal(res.headers['x-breakwater-error'], 'feature_disabled', `Host ${host} against a route written with the dot and a port: refused`)
  }
  for (const host of ['pay.local..', 'xpay.local', 'shop.local:9090']) {
    const res = await ask(proxyPort, 'GET', '/pay', host)
    t.equal(res.status, 200, `Host ${host} is another host: the catch-all`)
  }
  t.same(up.received.map((r) => r.headers.host), ['pay.local..', 'xpay.local', 'shop.local:9090'], 'only those reached the app')
})

t.test('a request without a Host (HTTP/1.0, or an empty Host) is refused by a killed host-matched route whose path it is on', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'pay', match: { pathPrefix: '/pay', host: 'pay.local' }, upstream: 'app', killSwitch: 'enablePay' },
      { match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { enablePay: false }
  })
  const hostless = ['GET /pay HTTP/1.0\r\n\r\n', 'GET /Pay/x HTTP/1.0\r\n\r\n', 'GET /pay HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n']
  for (const request of hostless) {
    const res = parseResponse(await raw(s.proxyPort, request))
    t.equal(res.headers['x-breakwater-error'], 'feature_disabled', `${JSON.stringify(request.split('\r\n')[0])} without a host: refused by the kill switch`)
  }
  t.equal(parseResponse(await raw(s.proxyPort, 'GET /other HTTP/1.0\r\n\r\n')).status, 200, 'another path without a host: the catch-all')
  t.equal(up.received.length, 1, 'only that one reached the app')
  await admin(s.admin, 'PUT', '/v1/flags/enablePay', { enabled: true, reason: 'pay is back' })
  t.equal(parseResponse(await raw(s.proxyPort, 'GET /pay HTTP/1.0\r\n\r\n')).status, 200, 'live, the route leaves a hostless request to the others')
  t.equal(up.received.length, 2)
})
