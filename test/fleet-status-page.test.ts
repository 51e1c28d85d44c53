/**
 * One incident, one status page incident across a fleet (SPEC §16, §19), on a real etcd: the
 * leader creates the page incident and writes its id on the incident key; when the leader
 * goes before acting, the sidecar that takes over updates that page incident by its id
 * (identified, monitoring, resolved) instead of creating a second one; when it goes after its
 * rollback, the follower that carries the incident on resolves that page incident.
 */
import t, { type Test } from 'tap'
import { startConnectedFleet, keepSending, holdIncidentEvents } from './helpers/fleet.js'
import { startReceiver, type Delivery, type Receiver } from './helpers/receiver.js'
import { startStatusPage } from './helpers/status-page.js'
import { startUpstream } from './helpers/upstream.js'
import { admin } from './helpers/admin.js'
import { sleep } from './helpers/http.js'
import type { TestSidecar } from './helpers/sidecar.js'
import { incidentKey } from '../src/control/notify.js'

t.setTimeout(180_000)

/** What the test waits for now (the check's source), for the dump of a test that timed out. */
let waiting: string | null = null

/** Poll `check` until it holds; the test's own timeout is the only bound. */
async function until (check: () => boolean | Promise<boolean>, everyMs = 50): Promise<void> {
  waiting = check.toString()
  while (!await check()) await sleep(everyMs)
  waiting = null
}

interface IncidentView { trigger: string, status: string, fleet?: { role: string, leader: string } }

async function incidentOf (s: TestSidecar): Promise<IncidentView | undefined> {
  return ((await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as IncidentView[]).find((i) => i.trigger === 'errors')
}

const pageStatus = (d: Delivery): string => String(d.body?.incident?.status)

async function triggerState (s: TestSidecar): Promise<string | undefined> {
  return ((await admin(s.admin, 'GET', '/v1/state')).body.triggers as Array<{ name: string, state: string }>).find((x) => x.name === 'errors')?.state
}

interface PagedFleet { state: { failing: boolean }, cd: Receiver, sp: Receiver, leader: TestSidecar, rest: TestSidecar[], quiet: Set<TestSidecar> }

/**
 * Three sidecars of a release whose upstream fails while `state.failing`, a rollback webhook
 * answering `respond` (the call numbered `fixedBy` fixes the release; later, a test may), a
 * Statuspage (a create answers with a new id, an update with the id it was sent to), failing
 * traffic through all three (but those put in `quiet`), and which of them leads the incident once
 * all know their role.
 */
async function pagedFleet (t: Test, respond: number[], fixedBy: number, extra: Record<string, unknown> = {}): Promise<PagedFleet> {
  const state = { failing: true }
  const app = await startUpstream((_req, res) => { res.writeHead(state.failing ? 500 : 200); res.end(state.failing ? 'broken release' : 'ok') })
  t.teardown(app.close)
  const cd = await startReceiver(respond)
  cd.answer = () => {
    if (cd.deliveries.length >= fixedBy) state.failing = false
    return { ok: true }
  }
  t.teardown(cd.close)
  const sp = await startReceiver([201, 200])
  let created = 0
  sp.answer = (d) => d.method === 'POST' ? { id: `sp-incident-${++created}`, status: pageStatus(d) } : { id: d.url.split('/').at(-1) }
  t.teardown(sp.close)
  const { fleet } = await startConnectedFleet(t, {
    version: '2.0.0',
    upstreams: { app: { url: app.url } },
    // No circuit: once the release is fixed, restoration is judged at once. An open circuit's
    // recoveryTimeout outlasted the 20 s verification on a loaded host: not restored, no resolve.
    circuitBreakers: {},
    rollback: { type: 'webhook', url: `${cd.url}/rollback`, retries: 0 },
    // minRequests 2: the traffic runs on one busy event loop with three sidecars; at 5 a stalled
    // loop thinned it below the volume for a whole window, the trigger re-armed as inconclusive
    // and fired again into the same incident (a second rollback attempt, a changed lastOutcome).
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 2, action: 'rollback' }],
    notifications: { statusPageId: 'page1', statusPageApiKey: 'sp-key', statusPageUrl: sp.url },
    verification: { intervalMs: 150, successes: 1, windowMs: '2s', timeoutMs: '20s' },
    ...extra
  })
  const quiet = new Set<TestSidecar>()
  keepSending(t, fleet, (s) => !quiet.has(s))
  // A test that failed or timed out says what each sidecar did last: a hang is otherwise silent.
  t.teardown(() => {
    if (t.passing()) return
    process.stderr.write(`waiting for: ${waiting ?? 'no condition (a step between two waits)'}\n`)
    for (const [i, s] of fleet.entries()) {
      const seen = s.logs.filter((l) => /incident|verif|rollback|fleet|trigger|statuspage|notif/.test(String(l.event)))
      process.stderr.write(`sidecar ${i} (${String(s.sidecar.fleet?.instance)}), last of ${seen.length} events:\n${seen.slice(-25).map((l) => `  ${String(l.time)} ${String(l.event)} ${String(l.msg)}`).join('\n')}\n`)
    }
  })
  await until(async () => (await Promise.all(fleet.map(incidentOf))).every((i) => i?.fleet !== undefined))
  const leaderIndex = (await Promise.all(fleet.map(incidentOf))).findIndex((i) => i?.fleet?.role === 'leader')
  return { state, cd, sp, leader: fleet[leaderIndex] as TestSidecar, rest: fleet.filter((_s, i) => i !== leaderIndex), quiet }
}

t.test('the leader created the page incident and goes before acting: the taker-over updates that page incident, through resolved, and none other is created', async (t) => {
  // The leader's rollback call fails (no retries); the taker-over's succeeds and fixes the release.
  const { cd, sp, leader, rest } = await pagedFleet(t, [500, 200], 2)
  const key = incidentKey('shop', '2.0.0', 'errors')
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
  // The page answered the resolve (its delivery arrives here before the sidecar reads the answer).
  await until(() => (taker as TestSidecar).sidecar.notifier.statusPage.get(key)?.status === 'resolved')

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

t.test('the leader goes while its create is in flight, before acting: the taker-over finds that page incident on the page and resolves it, and none other is created', async (t) => {
  const page = await startStatusPage()
  t.teardown(page.close)
  // The page makes the leader's incident but its answer (the id) never reaches the leader.
  page.holdCreates = true
  const { cd, leader, rest } = await pagedFleet(t, [500, 200], 2, {
    notifications: { statusPageId: 'page1', statusPageApiKey: 'sp-key', statusPageUrl: page.url }
  })
  const key = incidentKey('shop', '2.0.0', 'errors')
  await until(() => page.incidents.size === 1)
  await until(async () => ((await admin(leader.admin, 'GET', '/v1/state')).body.rollbacks as Array<{ status: string }>).some((r) => r.status === 'failed'))
  t.equal(leader.sidecar.fleet?.holding(key)?.statusPage, undefined, 'no page incident on the incident key: the leader never had its id')

  await leader.sidecar.close()
  page.holdCreates = false
  await until(() => cd.deliveries.length >= 2)
  const taker = rest.find((s) => s.sidecar.fleet?.holding(key)?.instance === s.sidecar.fleet?.instance)
  t.ok(taker !== undefined, 'a follower took over')
  await until(async () => (await Promise.all(rest.map(incidentOf))).every((i) => i?.status === 'restored'))
  await until(() => page.incidents.get('sp-incident-1')?.status === 'resolved')

  t.equal(page.incidents.size, 1, 'exactly one page incident across the fleet')
  t.same(page.incidents.get('sp-incident-1')?.statuses, ['investigating', 'identified', 'monitoring', 'resolved'], 'the leader\'s page incident, taken through resolved')
  t.same(page.deliveries.slice(1).map((d) => `${d.method} ${d.url}`), [
    'GET /v1/pages/page1/incidents/unresolved?per_page=100',
    'PATCH /v1/pages/page1/incidents/sp-incident-1',
    'PATCH /v1/pages/page1/incidents/sp-incident-1',
    'PATCH /v1/pages/page1/incidents/sp-incident-1'
  ], 'the taker-over looked for it before anything else, then updated it by its id')
  await until(() => (taker as TestSidecar).sidecar.notifier.statusPage.get(key)?.status === 'resolved')
  t.same((taker as TestSidecar).sidecar.notifier.statusPage.get(key), { id: 'sp-incident-1', status: 'resolved' }, 'and persists it as resolved')
})

t.test('the leader rolled back and goes before restoration was verified: the follower that carries the incident on resolves the leader\'s page incident', async (t) => {
  // The rollback is applied but does not fix the release until the test does.
  const { state, cd, sp, leader, rest } = await pagedFleet(t, [200], Infinity, {
    verification: { intervalMs: 150, successes: 1, windowMs: '2s', timeoutMs: '60s' }
  })
  const key = incidentKey('shop', '2.0.0', 'errors')
  const fleet = [leader, ...rest]
  // The rollback was applied (it did not fix the release yet): the page incident says monitoring, on every sidecar.
  for (const s of fleet) await until(() => s.sidecar.fleet?.holding(key)?.acted === true && s.sidecar.notifier.statusPage.get(key)?.status === 'monitoring')
  t.same(leader.sidecar.fleet?.holding(key)?.statusPage, { id: 'sp-incident-1', status: 'monitoring' }, 'the leader\'s page incident, monitoring, on the incident key')

  await leader.sidecar.close()
  await until(() => rest.some((s) => s.sidecar.fleet?.holding(key)?.instance === s.sidecar.fleet?.instance))
  const successor = rest.find((s) => s.sidecar.fleet?.holding(key)?.instance === s.sidecar.fleet?.instance) as TestSidecar
  t.same(successor.sidecar.fleet?.holding(key)?.statusPage, { id: 'sp-incident-1', status: 'monitoring' }, 'the successor holds the key with the leader\'s page incident')
  state.failing = false
  await until(async () => (await Promise.all(rest.map(incidentOf))).every((i) => i?.status === 'restored'))
  await until(() => successor.sidecar.notifier.statusPage.get(key)?.status === 'resolved')

  t.equal(sp.deliveries.filter((d) => d.method === 'POST').length, 1, 'exactly one page incident created across the fleet')
  const last = sp.deliveries.at(-1) as Delivery
  t.same([last.method, last.url, pageStatus(last)], ['PATCH', '/v1/pages/page1/incidents/sp-incident-1', 'resolved'], 'the successor resolved the leader\'s page incident by its id')
  t.same(successor.sidecar.notifier.statusPage.get(key), { id: 'sp-incident-1', status: 'resolved' }, 'and persists it as resolved')
  t.equal(cd.deliveries.length, 1, 'one rollback')
})

t.test('the leader goes before acting while no other sidecar still fires: one of them holds the incident, verifies restoration on its own traffic and resolves the leader\'s page incident; nobody rolls back', async (t) => {
  // The leader's rollback call fails (no retries); the release then recovers by itself.
  const { state, cd, sp, leader, rest, quiet } = await pagedFleet(t, [500], Infinity)
  const key = incidentKey('shop', '2.0.0', 'errors')
  await until(async () => ((await admin(leader.admin, 'GET', '/v1/state')).body.rollbacks as Array<{ status: string }>).some((r) => r.status === 'failed'))
  for (const f of rest) await until(() => f.sidecar.notifier.statusPage.get(key)?.id === 'sp-incident-1')
  t.equal(leader.sidecar.fleet?.holding(key)?.acted, false, 'the leader did not act: its rollback failed')

  // The release recovers. The followers' traffic says so and their triggers re-arm; the leader
  // gets no traffic, so its trigger cannot re-arm and it cannot end the incident itself.
  quiet.add(leader)
  state.failing = false
  for (const f of rest) await until(async () => await triggerState(f) === 'ok')
  t.equal((await incidentOf(leader))?.status, 'detected', 'the leader\'s incident is still open')
  t.same((await Promise.all(rest.map(incidentOf))).map((i) => [i?.status, i?.fleet?.role]), [['detected', 'follower'], ['detected', 'follower']], 'the followers re-armed and still follow: a follower does not end the fleet\'s incident')

  await leader.sidecar.close()
  await until(async () => (await Promise.all(rest.map(incidentOf))).every((i) => i?.status === 'restored'))
  const holder = rest.find((s) => s.sidecar.fleet?.holding(key)?.instance === s.sidecar.fleet?.instance)
  t.ok(holder !== undefined, 'one of them holds the incident')
  const taken = await incidentOf(holder as TestSidecar) as IncidentView & { clearedAt?: string, mitigation: { status: string } | null }
  t.match(taken, { status: 'restored', fleet: { role: 'leader', leader: (holder as TestSidecar).sidecar.fleet?.instance } }, 'restored, by the holder as the incident\'s leader')
  t.equal(taken.mitigation, null, 'with no mitigation of its own')
  t.type(taken.clearedAt, 'string', 'verified from the moment its signal had cleared')
  await until(() => (holder as TestSidecar).sidecar.notifier.statusPage.get(key)?.status === 'resolved')
  t.equal(sp.deliveries.filter((d) => d.method === 'POST').length, 1, 'one page incident across the fleet')
  t.same(sp.deliveries.slice(1).map((d) => [d.method, d.url, pageStatus(d)]), [
    ['PATCH', '/v1/pages/page1/incidents/sp-incident-1', 'monitoring'],
    ['PATCH', '/v1/pages/page1/incidents/sp-incident-1', 'resolved']
  ], 'the holder updated the leader\'s page incident by its id: monitoring, then resolved')
  t.equal(cd.deliveries.length, 1, 'one rollback call, the leader\'s: a sidecar whose signal cleared does not act')
  const other = rest.find((s) => s !== holder) as TestSidecar
  t.match(await incidentOf(other), { status: 'restored', fleet: { role: 'follower', leader: (holder as TestSidecar).sidecar.fleet?.instance } }, 'the other records the restoration, following the holder')
  t.ok((holder as TestSidecar).logs.some((l) => l.event === 'fleet_incident' && l.previousLeader === leader.sidecar.fleet?.instance && /verifies restoration/.test(String(l.msg))), 'the holder says why it verifies instead of acting')
})

t.test('a follower that reads the fleet state afresh across the handover (it never sees the key released) follows the new holder and records the restoration it verifies', async (t) => {
  const { state, leader, rest } = await pagedFleet(t, [200], Infinity, {
    verification: { intervalMs: 150, successes: 1, windowMs: '2s', timeoutMs: '60s' }
  })
  const key = incidentKey('shop', '2.0.0', 'errors')
  for (const s of [leader, ...rest]) await until(() => s.sidecar.fleet?.holding(key)?.acted === true)
  const [a, b] = rest as [TestSidecar, TestSidecar]
  const heldA = holdIncidentEvents(t, a)
  const heldB = holdIncidentEvents(t, b)
  await leader.sidecar.close()
  await until(() => heldA.late.length > 0 && heldB.late.length > 0)
  // a learns that the leader left and carries the incident on, as a rule; b misses it all and
  // reads afresh.
  heldA.release()
  // But b may still learn it by a read of its own (its watch events
  // are held, not its reads) and be the one to carry the incident on. The other one, which
  // reads afresh, must follow whichever holds it.
  const holds = (s: TestSidecar): boolean => s.sidecar.fleet?.holding(key)?.instance === s.sidecar.fleet?.instance
  await until(() => holds(a) || holds(b))
  const [holder, follower] = holds(a) ? [a, b] : [b, a]
  heldB.drop()
  await (follower.sidecar.fleet as unknown as { resync: () => Promise<number> }).resync()
  t.equal(follower.sidecar.fleet?.holding(key)?.instance, holder.sidecar.fleet?.instance, 'the follower reads the new holder as such, whatever it saw of the release')

  state.failing = false
  await until(async () => (await incidentOf(holder))?.status === 'restored')
  await until(async () => (await incidentOf(follower))?.status === 'restored')
  t.match(await incidentOf(follower), { status: 'restored', fleet: { role: 'follower', leader: holder.sidecar.fleet?.instance } }, 'it follows the new holder and records the restoration that one verified')
  t.ok(follower.logs.some((l) => l.event === 'fleet_incident' && l.leader === holder.sidecar.fleet?.instance && /holds the incident now|following/.test(String(l.msg))), 'and says whom it follows now')
})
