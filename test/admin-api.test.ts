import t from 'tap'
import { readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { send } from './helpers/http.js'
import { admin } from './helpers/admin.js'

function config (url: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    upstreams: { app: { url }, pay: { url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'enableNewCheckout' },
      { name: 'search', match: { pathPrefix: '/search' }, upstream: 'app', killSwitch: 'newSearch' },
      { name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { enableNewCheckout: true, newSearch: true, unrelated: true },
    circuitBreakers: { pay: { volumeThreshold: 2 } },
    ...extra
  }
}

t.test('authentication: missing or wrong token is 401; the admin API is not on the proxy or ops ports', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  const none = await admin(s.admin, 'GET', '/v1/state', undefined, null)
  t.equal(none.status, 401)
  t.equal(none.body.error, 'unauthorized')
  t.match(none.headers.get('www-authenticate'), /Bearer/)
  t.equal((await admin(s.admin, 'GET', '/v1/state', undefined, 'wrong-token-wrong-token')).status, 401)
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'x' }, null)).status, 401, 'no mutation without a token')
  t.equal((await send(s.proxy, '/checkout')).status, 200, 'and nothing changed')
  t.equal((await admin(s.admin, 'GET', '/v1/state')).status, 200)
  // /v1/* on the proxy port is ordinary traffic for the app; the ops port has no /v1.
  const viaProxy = await send(s.proxy, '/v1/state')
  t.equal(viaProxy.json<{ url: string }>().url, '/v1/state', 'routed to the upstream')
  t.equal((await admin(s.ops, 'GET', '/v1/state')).status, 404)
  t.equal((await admin(s.ops, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'x' })).status, 404)
  // A path the router cannot decode: the token first, then the API's own 400.
  const badPath = '/v1/circuits/%E0%A4%A'
  const anonymous = await admin(s.admin, 'PUT', badPath, { state: 'open', reason: 'x' }, null)
  t.equal(anonymous.status, 401, 'bad percent-encoding without a token: 401')
  const garbled = await admin(s.admin, 'PUT', badPath, { state: 'open', reason: 'x' })
  t.equal(garbled.status, 400, 'with the token: 400')
  t.same(Object.keys(garbled.body).sort(), ['error', 'message'], 'in the API\'s shape')
  t.equal(garbled.body.error, 'bad_request')
  const long = await admin(s.admin, 'PUT', `/v1/flags/${'f'.repeat(101)}`, { enabled: false, reason: 'x' })
  t.equal(long.status, 414, 'a name over 100 characters: 414')
  t.equal(long.body.error, 'path_too_long')
})

t.test('flag overrides: PUT kills at once, DELETE restores; unknown flag 404; reason required', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  const put = await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'checkout errors after deploy' })
  t.equal(put.status, 200)
  t.equal(put.body.enabled, false)
  t.equal(put.body.persisted, true)
  t.equal((await send(s.proxy, '/checkout')).status, 503, 'the very next request is refused')
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.equal(state.body.flags.enableNewCheckout.enabled, false)
  t.equal(state.body.flags.enableNewCheckout.origin, 'local')
  t.equal(state.body.flags.enableNewCheckout.override.reason, 'checkout errors after deploy')
  t.same(state.body.flags.enableNewCheckout.killSwitchFor, ['checkout'])
  const del = await admin(s.admin, 'DELETE', '/v1/flags/enableNewCheckout', { reason: 'fixed' })
  t.equal(del.status, 200)
  t.equal(del.body.enabled, true)
  t.equal((await send(s.proxy, '/checkout')).status, 200)

  t.equal((await admin(s.admin, 'PUT', '/v1/flags/nope', { enabled: false, reason: 'x' })).status, 404)
  const noReason = await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false })
  t.equal(noReason.status, 400)
  t.match(noReason.body.message, /reason/)
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', { enabled: 'no', reason: 'x' })).status, 400)
  const badJson = await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', undefined, undefined, '{"enabled": false,')
  t.equal(badJson.status, 400)
  t.equal(badJson.body.error, 'bad_request')
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', undefined, undefined, JSON.stringify({ enabled: false, reason: 'x'.repeat(40_000) }))).status, 413, 'bodies are limited in size')
  t.equal((await admin(s.admin, 'DELETE', '/v1/flags/enableNewCheckout')).status, 400, 'DELETE needs a reason too')
  t.equal((await send(s.proxy, '/checkout')).status, 200, 'no failed call changed anything')
})

t.test('a flag override with a ttl lapses on its own', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/newSearch', { enabled: false, reason: 'game day', ttl: '1s' })).status, 200)
  t.equal((await send(s.proxy, '/search')).status, 503)
  await new Promise((resolve) => setTimeout(resolve, 2300))
  t.equal((await send(s.proxy, '/search')).status, 200)
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/newSearch', { enabled: false, reason: 'x', ttl: 'soon' })).status, 400)
})

t.test('an out-of-range ttl is a 400 naming the field and the bound, on every call that takes one; nothing changes', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  const calls = (ttl: unknown): Array<[string, 'PUT' | 'POST', string, Record<string, unknown>]> => [
    ['flag', 'PUT', '/v1/flags/newSearch', { enabled: false, reason: 'x', ttl }],
    ['circuit', 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'x', ttl }],
    ['rateLimit', 'POST', '/v1/mitigations', { action: 'rateLimit', routes: ['search'], requestsPerSecond: 5, reason: 'x', ttl }],
    ['failover', 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['pay'], to: 'app', reason: 'x', ttl }]
  ]
  // Past any expiry time a Date holds (these were 500s), and just past the bound every duration has.
  for (const ttl of [1e300, '9999999999999s', 2 ** 53, 2147483648, '600h']) {
    for (const [what, method, path, body] of calls(ttl)) {
      const r = await admin(s.admin, method, path, body)
      t.equal(r.status, 400, `${what} ttl ${JSON.stringify(ttl)}: 400`)
      t.equal(r.body.error, 'bad_request')
      t.match(r.body.message, /^ttl must be at most 2147483647 ms \(about 24\.8 days/, `${what} ttl ${JSON.stringify(ttl)}: names the field and the bound`)
    }
  }
  t.equal((await send(s.proxy, '/search')).status, 200, 'nothing changed')
  const st = (await admin(s.admin, 'GET', '/v1/state')).body
  t.equal(st.flags.newSearch.origin, 'config')
  t.equal(st.circuits.pay.forced, null)
  t.same(st.mitigations, [])
  t.notOk(s.logs.some((l) => l.event === 'admin_error'), 'no unexpected error')
  // The bound itself is a ttl.
  const longest = await admin(s.admin, 'PUT', '/v1/flags/newSearch', { enabled: false, reason: 'x', ttl: 2147483647 })
  t.equal(longest.status, 200)
  t.equal(Date.parse(longest.body.expiresAt) - Date.parse(longest.body.at), 2147483647)
})

t.test('a ttl on a mitigation that does not take one is a 400, never a kill with no end', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  for (const body of [
    { action: 'killSwitch', flags: ['newSearch'], reason: 'x', ttl: '2s' },
    { action: 'circuitBreak', upstreams: ['pay'], reason: 'x', ttl: 60_000 }
  ]) {
    const r = await admin(s.admin, 'POST', '/v1/mitigations', body)
    t.equal(r.status, 400, `${body.action} with a ttl: 400`)
    t.match(r.body.message, new RegExp(`^ttl is taken by failover and rateLimit only, not ${body.action}`), 'says which take one')
  }
  t.equal((await send(s.proxy, '/search')).status, 200, 'nothing was killed')
  t.same((await admin(s.admin, 'GET', '/v1/state')).body.mitigations, [], 'no record')
})

t.test('a field a call does not take is a 400 naming it (and the field it looks like), never ignored: a misspelt scope or ttl changes nothing', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  const cases: Array<[string, string, Record<string, unknown>, RegExp]> = [
    ['PUT', '/v1/flags/newSearch', { enabled: false, reason: 'x', scpoe: 'fleet' }, /^unknown field "scpoe" \(did you mean "scope"\?\): this call takes enabled, reason, ttl, scope$/],
    ['PUT', '/v1/flags/newSearch', { enabled: false, reason: 'x', tll: '10m' }, /^unknown field "tll" \(did you mean "ttl"\?\)/],
    ['PUT', '/v1/flags/newSearch', { enabled: false, reason: 'x', Scope: 'fleet' }, /^unknown field "Scope" \(did you mean "scope"\?\)/],
    ['PUT', '/v1/flags/newSearch', { enabled: false, reason: 'x', fleet: true }, /^unknown field "fleet": this call takes/],
    ['PUT', '/v1/circuits/pay', { state: 'open', reason: 'x', ttl: '1m', sope: 'fleet' }, /^unknown field "sope" \(did you mean "scope"\?\)/],
    ['POST', '/v1/mitigations', { action: 'killSwitch', flag: ['newSearch'], reason: 'x' }, /^unknown field "flag" \(did you mean "flags"\?\)/],
    ['POST', '/v1/mitigations', { action: 'circuitBreak', upstream: ['pay'], reason: 'x' }, /^unknown field "upstream" \(did you mean "upstreams"\?\)/]
  ]
  for (const [method, path, body, message] of cases) {
    const r = await admin(s.admin, method, path, body)
    t.equal(r.status, 400, `${method} ${path} ${Object.keys(body).join(',')}: 400`)
    t.match(r.body, { error: 'bad_request', message }, 'naming the field')
  }
  t.equal((await send(s.proxy, '/search')).status, 200, 'nothing was killed')
  t.same((await admin(s.admin, 'GET', '/v1/state')).body.mitigations, [], 'no record')
  t.equal((await admin(s.admin, 'GET', '/v1/state')).body.circuits.pay.forced, null, 'no circuit forced')
  const killed = await admin(s.admin, 'PUT', '/v1/flags/newSearch', { enabled: false, reason: 'x', ttl: '10m', scope: 'local' })
  t.equal(killed.status, 200, 'the fields a call takes are taken')
})

t.test('an unexpected error in the admin API is a 500 and an error log line with the error, never silent', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  // A fault no input can cause (the state file's disk failing underneath, say): here, by hand.
  s.sidecar.control.setFlag = async () => { throw new Error('disk on fire') }
  const r = await admin(s.admin, 'PUT', '/v1/flags/newSearch', { enabled: false, reason: 'x' })
  t.equal(r.status, 500)
  t.same(r.body, { error: 'internal', message: 'unexpected error; see the sidecar log' })
  const line = s.logs.find((l) => l.event === 'admin_error')
  t.ok(line, 'logged')
  t.match(line, { level: 'error', method: 'PUT', path: '/v1/flags/:key', err: { message: 'disk on fire', stack: /Error: disk on fire/ } }, 'at error level, with the call and the error')
})

t.test('forced circuits: open, closed, auto; unknown upstream 404; an upstream without a breaker can be forced open', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  const open = await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'payments provider down' })
  t.equal(open.status, 200)
  t.equal(open.body.state, 'open')
  t.equal(open.body.forced, 'open')
  const refused = await send(s.proxy, '/pay')
  t.equal(refused.status, 503)
  t.equal(refused.headers['x-breakwater-mitigation'], 'circuit-open')
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'auto', reason: 'recovered' })).body.forced, null)
  t.equal((await send(s.proxy, '/pay')).status, 200)
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/nope', { state: 'open', reason: 'x' })).status, 404)
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'half', reason: 'x' })).status, 400)
  // app has no breaker configured: a manual circuit isolates it, and goes away on auto.
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'isolate' })).status, 200)
  t.equal((await send(s.proxy, '/anything')).status, 503)
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/app', { state: 'auto', reason: 'back' })).status, 200)
  t.equal((await send(s.proxy, '/anything')).status, 200)
  t.notOk('app' in (await admin(s.admin, 'GET', '/v1/state')).body.circuits)
})

t.test('mitigations: killSwitch with and without flags, lifting restores exactly what it changed', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  // An operator already forced newSearch off; the mitigation must not claim it.
  await admin(s.admin, 'PUT', '/v1/flags/newSearch', { enabled: false, reason: 'earlier' })
  const m = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', reason: 'incident 42' })
  t.equal(m.status, 201)
  t.match(m.body.id, /^m-/)
  t.same(m.body.targets, ['enableNewCheckout'], 'every enabled kill-switch flag, not unrelated flags')
  t.equal((await send(s.proxy, '/checkout')).status, 503)
  t.equal((await admin(s.admin, 'GET', '/v1/state')).body.mitigations[0].id, m.body.id)

  const lifted = await admin(s.admin, 'DELETE', `/v1/mitigations/${m.body.id as string}`, { reason: 'fixed forward' })
  t.equal(lifted.status, 200)
  t.equal(lifted.body.status, 'lifted')
  t.equal((await send(s.proxy, '/checkout')).status, 200, 'restored')
  t.equal((await send(s.proxy, '/search')).status, 503, 'the earlier operator override is untouched')
  t.equal((await admin(s.admin, 'DELETE', `/v1/mitigations/${m.body.id as string}`, { reason: 'again' })).status, 409)
  t.equal((await admin(s.admin, 'DELETE', '/v1/mitigations/m-nope', { reason: 'x' })).status, 404)

  const named = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['unrelated'], reason: 'x' })
  t.same(named.body.targets, ['unrelated'])
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['ghost'], reason: 'x' })).status, 404)
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'explode', reason: 'x' })).status, 400)
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { reason: 'x' })).status, 400)
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: 'unrelated', reason: 'x' })).status, 400)
})

t.test('mitigations: circuitBreak opens failing or half-open circuits, or the named ones; lifting hands them back', async (t) => {
  let code = 200
  const up = await startUpstream((_req, res) => { res.writeHead(code); res.end() })
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url, { circuitBreakers: { pay: { volumeThreshold: 100 } } }))
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'circuitBreak', reason: 'x' })).status, 409, 'nothing is failing')
  code = 500
  for (let i = 0; i < 4; i++) await send(s.proxy, '/pay')
  const m = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'circuitBreak', reason: 'payments failing' })
  t.equal(m.status, 201)
  t.same(m.body.targets, ['pay'])
  code = 200
  t.equal((await send(s.proxy, '/pay')).status, 503)
  await admin(s.admin, 'DELETE', `/v1/mitigations/${m.body.id as string}`, { reason: 'ok' })
  t.equal((await send(s.proxy, '/pay')).status, 200)
  const named = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'circuitBreak', upstreams: ['app'], reason: 'x' })
  t.same(named.body.targets, ['app'])
  t.equal((await send(s.proxy, '/x')).status, 503)
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'circuitBreak', upstreams: ['ghost'], reason: 'x' })).status, 404)
})

t.test('audit: every mutating call leaves one line, flushed before the answer; GET /v1/audit returns the newest', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'one' })
  // Read the file right after the answer: the line must already be there.
  const lines = readFileSync(join(s.stateDir, 'audit.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l))
  t.equal(lines.length, 1)
  t.match(lines[0], { action: 'flag.override', targets: ['enableNewCheckout'], reason: 'one', result: 'ok', requester: /127\.0\.0\.1/ })
  t.ok(Date.parse(lines[0].time) > 0)
  await admin(s.admin, 'DELETE', '/v1/flags/enableNewCheckout', { reason: 'two' })
  await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'three' })
  await admin(s.admin, 'PUT', '/v1/flags/nope', { enabled: false, reason: 'refused' })
  await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', { enabled: 'no', reason: 'bad input' })
  const audit = await admin(s.admin, 'GET', '/v1/audit?limit=3')
  t.equal(audit.status, 200)
  t.same(audit.body.entries.map((e: { reason: string }) => e.reason), ['refused', 'three', 'two'], 'newest first, limited; bad input (400) is not audited')
  t.match(audit.body.entries[0], { action: 'refused', wanted: 'flag.override', targets: ['nope'], result: 'unknown_flag', status: 404, requester: /127\.0\.0\.1/ }, 'a refused call is: who tried what, and why not')
  t.equal((await admin(s.admin, 'GET', '/v1/audit?limit=zero')).status, 400)
  const metrics = await (await fetch(`${s.ops}/metrics`)).text()
  t.match(metrics, /breakwater_mitigations_total\{action="killSwitch"\} 0/)
  t.ok(s.logs.some((l) => l.event === 'mitigation' && l.level === 'warn'), 'mitigation events logged at warn')
})

t.test('a refused mitigation that named nothing says in the audit what it was about', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url, { version: '3.1.4', featureFlags: { enableNewCheckout: false, newSearch: false, unrelated: true } }))
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'bad deploy' })).status, 409, 'no rollback action configured')
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', reason: 'kill all' })).status, 409, 'every kill switch is off already')
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'circuitBreak', reason: 'break all' })).status, 409, 'no circuit is failing')
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/ghost', { state: 'open', reason: 'ghost' })).status, 404)
  const entries = (await admin(s.admin, 'GET', '/v1/audit?limit=4')).body.entries.reverse()
  t.match(entries, [
    { action: 'refused', wanted: 'mitigation.rollback', result: 'rollback_not_configured', reason: 'bad deploy' },
    { action: 'refused', wanted: 'mitigation.killSwitch', result: 'nothing_to_mitigate', reason: 'kill all' },
    { action: 'refused', wanted: 'mitigation.circuitBreak', result: 'nothing_to_mitigate', reason: 'break all' },
    { action: 'refused', wanted: 'circuit.force', result: 'unknown_upstream', reason: 'ghost', targets: ['ghost'] }
  ])
  t.same(entries[0].targets, ['3.1.4'], 'a rollback is about the version running')
  t.same([...entries[1].targets].sort(), ['enableNewCheckout', 'newSearch'], 'a bare kill switch is about the kill-switch flags it looked at')
  t.same(entries[2].targets, ['pay'], 'a bare circuit break is about the circuits it looked at')
})

t.test('state persists in STATEDIR/state.json, written with mode 0600', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  await admin(s.admin, 'PUT', '/v1/flags/newSearch', { enabled: false, reason: 'persist me' })
  const file = join(s.stateDir, 'state.json')
  const state = JSON.parse(readFileSync(file, 'utf8'))
  t.equal(state.overrides.newSearch.enabled, false)
  t.equal(state.overrides.newSearch.reason, 'persist me')
  t.equal(statSync(file).mode & 0o777, 0o600)
})

t.test('POST /v1/reload applies a valid config and refuses an invalid one', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url))
  const result = await admin(s.admin, 'POST', '/v1/reload', {})
  t.equal(result.status, 422, 'a sidecar not started from a file cannot reload')
  t.equal(result.body.error, 'invalid_config')
})
