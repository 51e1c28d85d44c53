import t from 'tap'
import { join } from 'node:path'
import { FlagdCore } from '@openfeature/flagd-core'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { send, eventually, raw } from './helpers/http.js'
import { parseResponse } from './helpers/wire.js'
import { startWebSocketUpstream, handshakeRequest } from './helpers/websocket.js'
import { admin } from './helpers/admin.js'
import { flagDir, flagdText, writeFlagFile, checkoutRoutes, type FlagDef } from './helpers/flags.js'

const KEY = 'dGhlIHNhbXBsZSBub25jZQ=='

/** A kill switch that flagd turns off for /checkout/v2 and for two users, on for everyone else. */
const checkoutRule: FlagDef = {
  defaultVariant: 'on',
  targeting: {
    if: [{ or: [
      { starts_with: [{ var: 'path' }, '/checkout/v2'] },
      { in: [{ var: 'targetingKey' }, ['blocked-1', 'blocked-2']] }
    ] }, 'off', null]
  }
}


t.test('flag file: a targeted kill switch blocks exactly the requests flagd says are off, and only those reach no upstream', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  writeFlagFile(path, { enableNewCheckout: checkoutRule })
  const { proxy, sidecar, ops } = await startTestSidecar(t, checkoutRoutes(up.url, {
    featureFlags: { enableNewCheckout: true },
    flagSource: { type: 'flagd-file', path },
    flags: { targetingKeyHeader: 'X-User' }
  }))
  const cases: Array<[string, string | null, number, string]> = [
    ['/checkout/v1/cart', 'alice', 200, 'a path and user the rule does not name'],
    ['/checkout/v2/pay', 'alice', 503, 'starts_with on the path'],
    ['/Checkout/V2/', 'alice', 503, 'the path the route matched on: a rule cannot be dodged by spelling'],
    ['/checkout/v%32/pay', 'alice', 503, 'nor by percent-encoding'],
    ['/checkout%2Fv2/pay', 'alice', 503, 'nor by an encoded slash, which an app that decodes its path reads as /'],
    ['/checkout/v1/cart', 'blocked-2', 503, 'in on the targeting key (header named by flags.targetingKeyHeader)'],
    ['/checkout/v1/cart', null, 200, 'no targeting key: the rule does not match'],
    ['/other', 'blocked-1', 200, 'a route without the kill switch is untouched']
  ]
  for (const [p, user, want, why] of cases) {
    const r = await send(proxy, p, { headers: user === null ? {} : { 'x-user': user } })
    t.equal(r.status, want, `${p} ${user ?? '(no user)'}: ${why}`)
    if (want === 503) t.equal(r.json().error, 'feature_disabled')
  }
  t.equal(up.received.length, 3, 'only the three allowed requests reached the upstream')
  t.same(up.received.map((r) => r.url), ['/checkout/v1/cart', '/checkout/v1/cart', '/other'])
  t.ok(sidecar.flags.targeted?.has('enableNewCheckout'), 'the flag is evaluated per request')
  t.equal(sidecar.flags.enabled('enableNewCheckout'), true, 'its value without request context (metrics, state)')
  const metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_rejections_total\{route="checkout",reason="kill_switch"\} 5/)
})

t.test('flag file: method and host are in the context, and a killed route still claims the methods it does not serve', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  writeFlagFile(path, {
    ordersWrite: { targeting: { if: [{ in: [{ var: 'method' }, ['POST', 'DELETE']] }, 'off', null] } },
    beta: { targeting: { if: [{ '==': [{ var: 'host' }, 'beta.shop.example'] }, 'off', 'on'] } },
    admin: { targeting: { if: [{ '==': [{ var: 'hostname' }, 'admin.shop.example'] }, 'off', 'on'] } }
  })
  const { proxy } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'orders', match: { pathPrefix: '/orders', methods: ['POST', 'PUT'] }, upstream: 'app', killSwitch: 'ordersWrite' },
      { name: 'beta', match: { pathPrefix: '/beta' }, upstream: 'app', killSwitch: 'beta' },
      { name: 'admin', match: { pathPrefix: '/admin' }, upstream: 'app', killSwitch: 'admin' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { ordersWrite: true, beta: true, admin: true },
    flagSource: { type: 'flagd-file', path }
  })
  t.equal((await send(proxy, '/orders', { method: 'POST' })).status, 503, 'POST is off')
  t.equal((await send(proxy, '/orders', { method: 'PUT' })).status, 200, 'PUT is on')
  t.equal((await send(proxy, '/orders', { method: 'DELETE' })).status, 503, 'DELETE is off for this request: the killed route claims it instead of letting the catch-all serve it')
  t.equal((await send(proxy, '/orders', { method: 'GET' })).status, 200, 'GET is on: the route lets it fall through to the catch-all')
  t.equal((await send(proxy, '/beta/x', { headers: { host: 'BETA.shop.example' } })).status, 503, 'host, case-folded')
  t.equal((await send(proxy, '/beta/x', { headers: { host: 'www.shop.example' } })).status, 200)
  t.equal((await send(proxy, '/beta/x', { headers: { host: 'Beta.Shop.Example.' } })).status, 503, 'host: a final dot names the same host (the app serves it as beta.shop.example)')
  t.equal((await send(proxy, '/beta/x', { headers: { host: 'beta.shop.example:8080' } })).status, 200, 'host keeps the port the client sent')
  for (const host of ['admin.shop.example', 'ADMIN.shop.example.:80', 'admin.shop.example:8080']) {
    t.equal((await send(proxy, '/admin', { headers: { host } })).status, 503, `hostname: ${host} is admin.shop.example whatever its port`)
  }
  t.equal((await send(proxy, '/admin', { headers: { host: 'www.shop.example:80' } })).status, 200)
  t.same(up.received.map((r) => `${r.method} ${r.url}`), ['PUT /orders', 'GET /orders', 'GET /beta/x', 'GET /beta/x', 'GET /admin'], 'only the requests the rules leave on reach the app')
})

t.test('flag file: by default the targeting key is the request id, so a fractional rule splits requests as flagd does', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  const flags = { enableNewCheckout: { targeting: { fractional: [['on', 50], ['off', 50]] } } }
  writeFlagFile(path, flags)
  const core = new FlagdCore()
  core.setConfigurations(flagdText(flags))
  const { proxy } = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true }, flagSource: { type: 'flagd-file', path } }))
  let allowed = 0
  let blocked = 0
  for (let i = 0; i < 40; i++) {
    const id = `req-${i}`
    const want = core.resolveBooleanEvaluation('enableNewCheckout', true, { targetingKey: id, path: '/checkout', method: 'GET', host: '' }).value
    const r = await send(proxy, '/checkout', { headers: { 'x-request-id': id } })
    t.equal(r.status, want ? 200 : 503, `${id}: flagd says ${want ? 'on' : 'off'}`)
    if (want) allowed++
    else blocked++
  }
  t.ok(allowed > 0 && blocked > 0, `both buckets were hit (${allowed} on, ${blocked} off)`)
  t.equal(up.received.length, allowed, 'the upstream saw exactly the requests flagd let through')

  // Without x-request-id, Breakwater creates one: that id is the key.
  for (let i = 0; i < 10; i++) {
    const r = await send(proxy, '/checkout')
    const id = r.status === 503 ? r.json<{ requestId: string }>().requestId : JSON.parse(r.body).headers['x-request-id'] as string
    const want = core.resolveBooleanEvaluation('enableNewCheckout', true, { targetingKey: id, path: '/checkout', method: 'GET', host: '' }).value
    t.equal(r.status, want ? 200 : 503, `generated id ${id}`)
  }
})

t.test('an admin override beats targeting; dropping it brings targeting back; a file without targeting is a plain read again', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  writeFlagFile(path, { enableNewCheckout: checkoutRule })
  const { proxy, admin: adminUrl, sidecar } = await startTestSidecar(t, checkoutRoutes(up.url, {
    featureFlags: { enableNewCheckout: true },
    flagSource: { type: 'flagd-file', path, pollIntervalMs: 50 },
    flags: { targetingKeyHeader: 'x-user' }
  }))
  t.equal((await send(proxy, '/checkout/v1')).status, 200)
  t.equal((await admin(adminUrl, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'incident' })).status, 200)
  t.equal((await send(proxy, '/checkout/v1')).status, 503, 'killed by the operator for every request')
  t.equal(sidecar.flags.targeted, null, 'no targeted flag left: the request path is a snapshot read')
  t.equal((await admin(adminUrl, 'PUT', '/v1/flags/enableNewCheckout', { enabled: true, reason: 'forced on' })).status, 200)
  t.equal((await send(proxy, '/checkout/v2')).status, 200, 'forced on for every request, even where the rule says off')
  t.equal((await admin(adminUrl, 'DELETE', '/v1/flags/enableNewCheckout', { reason: 'over' })).status, 200)
  t.equal((await send(proxy, '/checkout/v2')).status, 503, 'targeting again')
  t.equal((await send(proxy, '/checkout/v1')).status, 200)
  const state = await admin(adminUrl, 'GET', '/v1/state')
  t.match(state.body.flags.enableNewCheckout, { enabled: true, targeted: true, origin: 'file' })

  writeFlagFile(path, { enableNewCheckout: { defaultVariant: 'off' } })
  t.ok(await eventually(() => sidecar.flags.targeted === null, 5000), 'the rewritten file has no targeting')
  t.equal((await send(proxy, '/checkout/v1')).status, 503, 'and its plain value applies')
})

t.test('a sidecar whose flags have no targeting never builds a per-request context', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  writeFlagFile(path, { enableNewCheckout: { defaultVariant: 'off' } })
  const { proxy, sidecar } = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true }, flagSource: { type: 'flagd-file', path } }))
  t.equal(sidecar.flags.targeted, null)
  t.equal((await send(proxy, '/checkout')).status, 503)
  t.equal(up.received.length, 0)
})

t.test('a WebSocket handshake is decided by the same targeting as any request', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  writeFlagFile(path, { enableChat: { targeting: { if: [{ in: [{ var: 'targetingKey' }, ['blocked-1']] }, 'off', null] } } })
  const { proxyPort } = await startTestSidecar(t, {
    upstreams: { ws: { url: up.url } },
    routes: [{ match: { pathPrefix: '/ws' }, upstream: 'ws', killSwitch: 'enableChat' }],
    flagSource: { type: 'flagd-file', path },
    flags: { targetingKeyHeader: 'x-user' }
  })
  const refused = parseResponse(await raw(proxyPort, handshakeRequest('/ws', KEY, ['X-User: blocked-1'])))
  t.equal(refused.status, 503, 'the user flagd switches off cannot open the socket')
  t.equal(refused.headers['x-breakwater-error'], 'feature_disabled')
  t.equal(up.handshakes.length, 0)
  const opened = parseResponse(await raw(proxyPort, handshakeRequest('/ws', KEY, ['X-User: alice']), 500))
  t.equal(opened.status, 101, 'another user can')
  t.equal(up.handshakes.length, 1)
})

t.test('a rule flagd cannot compile, written at run time, gives the code default as in flagd, with an error log and a count', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  writeFlagFile(path, { enableNewCheckout: checkoutRule })
  const { proxy, ops, logs } = await startTestSidecar(t, checkoutRoutes(up.url, {
    featureFlags: { enableNewCheckout: false },
    flagSource: { type: 'flagd-file', path, pollIntervalMs: 50 }
  }))
  t.equal((await send(proxy, '/checkout/v1')).status, 200, 'the rule says on')
  writeFlagFile(path, { enableNewCheckout: { targeting: { if: [{ no_such_operator: [1] }, 'off', 'on'] } } })
  t.ok(await eventually(async () => (await send(proxy, '/checkout/v1')).status === 503, 5000), 'the code default (featureFlags: false) applies')
  t.ok(logs.some((l) => l.event === 'flag_source' && l.flag === 'enableNewCheckout' && l.level === 'error'), 'an error log names the flag')
  const metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_flag_source_errors_total\{source="file"\} 1/)
})
