/**
 * Operators never wait (SPEC §15): while a rollback's webhook hangs, kill, restore, circuit,
 * failover, rateLimit and lift are answered and take effect on proxied traffic; the rollback's record goes
 * running → succeeded | failed in the background.
 */
import t from 'tap'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { admin } from './helpers/admin.js'
import { send, eventually } from './helpers/http.js'

/** A rollback receiver that holds every request open until the test answers it. */
async function holdingReceiver (): Promise<{ url: string, arrived: Promise<void>, open: () => boolean, answer: (status: number) => void, close: () => Promise<void> }> {
  const held: http.ServerResponse[] = []
  let arrive = (): void => {}
  const arrived = new Promise<void>((resolve) => { arrive = resolve })
  const server = http.createServer((req, res) => {
    req.resume()
    req.on('end', () => { held.push(res); arrive() })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/rollback`,
    arrived,
    // Provably still open: the request arrived, nothing was written back, its socket is alive.
    open: () => held.length === 1 && !held[0]!.headersSent && held[0]!.socket !== null && !held[0]!.socket.destroyed,
    answer: (status) => { for (const res of held) { res.writeHead(status, { 'content-type': 'application/json' }); res.end('{}') } },
    close: async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

/** Whether the end of rollback `id` is in the audit log (its last step). */
async function audited (base: string, id: string): Promise<boolean> {
  const audit = await admin(base, 'GET', '/v1/audit?limit=5')
  return audit.body.entries.some((e: any) => e.action === 'mitigation.rollback.result' && e.id === id)
}

function config (app: string, pay: string, rollbackUrl: string): Record<string, unknown> {
  return {
    service: 'checkout',
    version: '2.4.1',
    upstreams: { app: { url: app }, pay: { url: pay } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'enableNewCheckout' },
      { name: 'search', match: { pathPrefix: '/search' }, upstream: 'app', killSwitch: 'newSearch' },
      { name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay' },
      { match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { enableNewCheckout: true, newSearch: true },
    circuitBreakers: { pay: {} },
    // A long timeout and no retries: the webhook hangs for as long as the test holds it.
    rollback: { type: 'webhook', url: rollbackUrl, timeoutMs: '10m', retries: 0 }
  }
}

t.test('while a rollback webhook hangs, kill, restore, circuit and lift are answered and take effect; the rollback then succeeds', async (t) => {
  const app = await startUpstream()
  t.teardown(app.close)
  const pay = await startUpstream()
  t.teardown(pay.close)
  const cd = await holdingReceiver()
  t.teardown(cd.close)
  const s = await startTestSidecar(t, config(app.url, pay.url, cd.url))

  const kill = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'killSwitch', flags: ['enableNewCheckout'], reason: 'checkout errors' })
  t.equal(kill.status, 201)
  t.equal((await send(s.proxy, '/checkout')).status, 503)

  const rollback = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'errors after 2.4.1' })
  t.equal(rollback.status, 202, 'a rollback is accepted at once: it runs in the background')
  t.match(rollback.body, { action: 'rollback', status: 'running', targets: ['2.4.1'], finishedAt: null })
  const id = rollback.body.id as string
  await cd.arrived
  t.ok(cd.open(), 'the rollback webhook is being held open')

  const off = await admin(s.admin, 'PUT', '/v1/flags/newSearch', { enabled: false, reason: 'search too' })
  t.equal(off.status, 200, 'kill answered while the rollback hangs')
  t.equal((await send(s.proxy, '/search')).status, 503, 'and in force')
  const open = await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'provider down' })
  t.equal(open.status, 200, 'circuit answered while the rollback hangs')
  t.equal((await send(s.proxy, '/pay')).status, 503, 'and in force')
  const lift = await admin(s.admin, 'DELETE', `/v1/mitigations/${kill.body.id as string}`, { reason: 'checkout fixed' })
  t.equal(lift.status, 200, 'lift answered while the rollback hangs')
  t.equal((await send(s.proxy, '/checkout')).status, 200, 'and the route serves again')
  const restore = await admin(s.admin, 'DELETE', '/v1/flags/newSearch', { reason: 'search fine' })
  t.equal(restore.status, 200, 'restore answered while the rollback hangs')
  t.equal((await send(s.proxy, '/search')).status, 200)

  const failover = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['pay'], to: 'app', reason: 'pay region down' })
  t.equal(failover.status, 201, 'failover answered while the rollback hangs')
  t.equal((await send(s.proxy, '/pay')).headers['x-breakwater-failover'], 'app', 'and in force')
  const limit = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rateLimit', routes: ['search'], requestsPerSecond: 0.01, burst: 1, reason: 'search spike' })
  t.equal(limit.status, 201, 'rateLimit answered while the rollback hangs')
  t.same([(await send(s.proxy, '/search')).status, (await send(s.proxy, '/search')).status], [200, 429], 'and in force')
  for (const m of [failover, limit]) t.equal((await admin(s.admin, 'DELETE', `/v1/mitigations/${m.body.id as string}`, { reason: 'over' })).status, 200, `lifting ${m.body.action as string} answered too`)
  t.equal((await send(s.proxy, '/search')).status, 200)

  // This sidecar was not started from a file, so a reload is refused — but answered, not queued.
  const reload = await admin(s.admin, 'POST', '/v1/reload', { reason: 'reload while the rollback hangs' })
  t.equal(reload.status, 422, 'reload answered while the rollback hangs')
  // Audit lines are appended after the answer: wait for it.
  t.ok(await eventually(async () => (await admin(s.admin, 'GET', '/v1/audit?limit=20')).body.entries.some((e: any) => e.action === 'config.reload'), 30_000), 'and audited')

  const again = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'again' })
  t.equal(again.status, 409, 'two rollbacks never run at once: the second is refused')
  t.equal(again.body.error, 'rollback_in_progress')
  t.equal(again.body.mitigation.id, id, 'naming the one that runs')

  const state = await admin(s.admin, 'GET', '/v1/state')
  t.match(state.body.mitigations.find((m: any) => m.id === id), { status: 'running' }, 'GET /v1/state shows it running')
  t.match(state.body.rollbacks[0], { id, status: 'running' })
  const running = await admin(s.admin, 'GET', '/v1/audit?limit=50')
  t.ok(running.body.entries.some((e: any) => e.action === 'mitigation.rollback' && e.result === 'running' && e.id === id), 'audited as running')
  t.ok(cd.open(), 'all of the above happened while the webhook was still held open')

  cd.answer(200)
  t.ok(await eventually(async () => await audited(s.admin, id), 30_000), 'the rollback ends, audited')
  const done = await admin(s.admin, 'GET', `/v1/mitigations/${id}`)
  t.match(done.body, { status: 'succeeded', result: { ok: true, status: 200 }, error: null })
  t.ok(typeof done.body.finishedAt === 'string')
  // Found by action and id: the incident the rollback opened may audit its own steps after it.
  const audit = await admin(s.admin, 'GET', '/v1/audit?limit=50')
  t.match(audit.body.entries.find((e: any) => e.action === 'mitigation.rollback.result' && e.id === id), { result: 'succeeded', targets: ['2.4.1'] })
  const after = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'once more' })
  t.equal(after.body.error, 'already_rolled_back', 'never the same version twice')
})

t.test('a failing rollback webhook: the record becomes failed with the reason, in state, incidents and audit', async (t) => {
  const app = await startUpstream()
  t.teardown(app.close)
  const cd = await holdingReceiver()
  t.teardown(cd.close)
  const s = await startTestSidecar(t, config(app.url, app.url, cd.url))
  const rollback = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'bad release' })
  t.equal(rollback.status, 202)
  const id = rollback.body.id as string
  await cd.arrived
  const incidents = await admin(s.admin, 'GET', '/v1/incidents')
  t.match(incidents.body.incidents[0], { status: 'detected', mitigation: { id, action: 'rollback', status: 'running' } }, 'the incident shows the rollback running')

  cd.answer(403)
  t.ok(await eventually(async () => await audited(s.admin, id), 30_000), 'the rollback ends, audited')
  t.equal((await admin(s.admin, 'GET', `/v1/mitigations/${id}`)).body.status, 'failed', 'the record became failed')
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.match(state.body.rollbacks[0], { id, status: 'failed', error: /status 403/, result: { ok: false, status: 403 } })
  t.notOk(state.body.mitigations.some((m: any) => m.id === id), 'a failed rollback is not in force')
  const incident = (await admin(s.admin, 'GET', '/v1/incidents')).body.incidents[0]
  // Nothing in force: the operator's incident is judged on real traffic from the failure, not left open.
  t.match(incident, { status: /^(verifying|restored|unverified)$/, clearedAt: String, mitigation: { id, status: 'failed', error: /status 403/ } })
  const audit = await admin(s.admin, 'GET', '/v1/audit?limit=50')
  t.match(audit.body.entries.find((e: any) => e.action === 'mitigation.rollback.result' && e.id === id), { result: 'failed', error: /status 403/ })
  t.equal((await admin(s.admin, 'DELETE', `/v1/mitigations/${id}`, { reason: 'x' })).status, 409, 'nothing to lift')
  t.equal((await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'try again' })).status, 202, 'a failed rollback may be tried again')
})
