/**
 * One incident, one status page incident across a fleet (SPEC §16, §19), on a real etcd: the
 * leader creates the page incident and writes its id on the incident key; when the leader
 * goes before acting, the sidecar that takes over updates that page incident by its id
 * (identified, monitoring, resolved) instead of creating a second one.
 */
import t from 'tap'
import { startConnectedFleet, keepSending } from './helpers/fleet.js'
import { startReceiver, type Delivery } from './helpers/receiver.js'
import { startUpstream } from './helpers/upstream.js'
import { admin } from './helpers/admin.js'
import { sleep } from './helpers/http.js'
import type { TestSidecar } from './helpers/sidecar.js'
import { incidentKey } from '../src/control/notify.js'

t.setTimeout(180_000)

/** Poll `check` until it holds; the test's own timeout is the only bound. */
async function until (check: () => boolean | Promise<boolean>, everyMs = 50): Promise<void> {
  while (!await check()) await sleep(everyMs)
}

interface IncidentView { trigger: string, status: string, fleet?: { role: string, leader: string } }

async function incidentOf (s: TestSidecar): Promise<IncidentView | undefined> {
  return ((await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as IncidentView[]).find((i) => i.trigger === 'errors')
}

const pageStatus = (d: Delivery): string => String(d.body?.incident?.status)

t.test('the leader created the page incident and goes before acting: the taker-over updates that page incident, through resolved, and none other is created', async (t) => {
  const state = { failing: true }
  const app = await startUpstream((_req, res) => { res.writeHead(state.failing ? 500 : 200); res.end(state.failing ? 'broken release' : 'ok') })
  t.teardown(app.close)
  // The leader's rollback call fails (no retries); the taker-over's succeeds and fixes the release.
  const cd = await startReceiver([500, 200])
  cd.answer = () => {
    if (cd.deliveries.length >= 2) state.failing = false
    return { ok: true }
  }
  t.teardown(cd.close)
  // A Statuspage: a create answers with a new id, an update with the id it was sent to.
  const sp = await startReceiver([201, 200])
  let created = 0
  sp.answer = (d) => d.method === 'POST' ? { id: `sp-incident-${++created}`, status: pageStatus(d) } : { id: d.url.split('/').at(-1) }
  t.teardown(sp.close)

  const { fleet } = await startConnectedFleet(t, {
    version: '2.0.0',
    upstreams: { app: { url: app.url } },
    rollback: { type: 'webhook', url: `${cd.url}/rollback`, retries: 0 },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 5, action: 'rollback' }],
    notifications: { statusPageId: 'page1', statusPageApiKey: 'sp-key', statusPageUrl: sp.url },
    verification: { intervalMs: 150, successes: 1, windowMs: '2s', timeoutMs: '20s' }
  })
  const key = incidentKey('shop', '2.0.0', 'errors')
  keepSending(t, fleet)

  await until(async () => (await Promise.all(fleet.map(incidentOf))).every((i) => i?.fleet !== undefined))
  const leaderIndex = (await Promise.all(fleet.map(incidentOf))).findIndex((i) => i?.fleet?.role === 'leader')
  const leader = fleet[leaderIndex] as TestSidecar
  const rest = fleet.filter((_s, i) => i !== leaderIndex)
  // The leader created the page incident, and its id is on the incident key; its rollback failed.
  await until(() => leader.sidecar.fleet?.holding(key)?.statusPage !== undefined)
  t.same(leader.sidecar.fleet?.holding(key)?.statusPage, { id: 'sp-incident-1', status: 'investigating' }, 'the leader wrote its page incident on the incident key')
  await until(async () => ((await admin(leader.admin, 'GET', '/v1/state')).body.rollbacks as Array<{ status: string }>).some((r) => r.status === 'failed'))
  t.equal(leader.sidecar.fleet?.holding(key)?.acted, false, 'not acted on: a follower will take over')
  t.same(sp.deliveries.map((d) => [d.method, d.url, pageStatus(d)]), [['POST', '/v1/pages/page1/incidents', 'investigating']], 'the leader created one page incident')
  for (const f of rest) await until(() => f.sidecar.notifier.statusPage.get(key)?.id === 'sp-incident-1')
  t.pass('each follower recorded the leader\'s page incident')

  await leader.sidecar.close()
  await until(() => cd.deliveries.length >= 2)
  const taker = rest.find((s) => s.sidecar.fleet?.holding(key)?.instance === s.sidecar.fleet?.instance)
  t.ok(taker !== undefined, 'a follower took over')
  await until(async () => (await Promise.all(rest.map(incidentOf))).every((i) => i?.status === 'restored'))
  await until(() => sp.deliveries.some((d) => pageStatus(d) === 'resolved'))

  t.equal(sp.deliveries.filter((d) => d.method === 'POST').length, 1, 'exactly one page incident created across the fleet')
  t.same(sp.deliveries.slice(1).map((d) => [d.method, d.url, pageStatus(d)]), [
    ['PATCH', '/v1/pages/page1/incidents/sp-incident-1', 'identified'],
    ['PATCH', '/v1/pages/page1/incidents/sp-incident-1', 'monitoring'],
    ['PATCH', '/v1/pages/page1/incidents/sp-incident-1', 'resolved']
  ], 'the taker-over updated the leader\'s page incident by its id, through resolved')
  t.same((taker as TestSidecar).sidecar.notifier.statusPage.get(key), { id: 'sp-incident-1', status: 'resolved' }, 'and persists it as resolved')
  t.ok(rest.some((s) => s.logs.some((l) => l.event === 'fleet_incident' && l.previousLeader === leader.sidecar.fleet?.instance)), 'the takeover names the leader that left')
  t.notOk(rest.some((s) => s.logs.some((l) => l.event === 'statuspage_unknown_incident')), 'no update refused for an unknown page incident')
})
