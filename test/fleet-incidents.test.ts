/**
 * One incident, one actor (SPEC §16), on a real etcd: three sidecars fire the same trigger,
 * exactly one (the one that creates the incident key under its lease) calls the rollback
 * webhook; the others follow it, visibly. When the leader goes before its action succeeded,
 * a still-firing sidecar takes over; when it goes after, before restoration was verified, a
 * follower carries the incident on without acting again.
 */
import t, { type Test } from 'tap'
import { startConnectedFleet, keepSending } from './helpers/fleet.js'
import { startReceiver, type Receiver } from './helpers/receiver.js'
import { startUpstream } from './helpers/upstream.js'
import { admin } from './helpers/admin.js'
import { eventually, sleep } from './helpers/http.js'
import type { TestSidecar } from './helpers/sidecar.js'
import type { EtcdCluster } from './helpers/etcd.js'
import { incidentKey } from '../src/control/notify.js'

async function incidentSetup (t: Test, respond: number[]): Promise<{ fleet: TestSidecar[], cd: Receiver, etcd: EtcdCluster }> {
  const failing = await startUpstream((_req, res) => { res.writeHead(500); res.end('broken release') })
  t.teardown(failing.close)
  const cd = await startReceiver(respond)
  t.teardown(cd.close)
  const { fleet, etcd } = await startConnectedFleet(t, {
    version: '2.0.0',
    upstreams: { app: { url: failing.url } },
    rollback: { type: 'webhook', url: `${cd.url}/rollback`, retries: 0 },
    // minRequests 2: the traffic runs on one busy event loop with three sidecars; at 5 a stalled
    // loop thinned it below the volume for a whole window, the trigger re-armed as inconclusive
    // and fired again into the same incident (a second rollback attempt, a changed lastOutcome).
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 2, action: 'rollback' }]
  })
  return { fleet, cd, etcd }
}

interface IncidentView { trigger: string, fleet?: { role: string, leader: string } }

async function fleetRole (s: TestSidecar): Promise<IncidentView['fleet'] | undefined> {
  const incidents = (await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as IncidentView[]
  return incidents.find((i) => i.trigger === 'errors' && i.fleet !== undefined)?.fleet
}

async function outcomes (fleet: TestSidecar[]): Promise<string[]> {
  return await Promise.all(fleet.map(async (s) => {
    const triggers = (await admin(s.admin, 'GET', '/v1/state')).body.triggers as Array<{ name: string, lastOutcome: string | null }>
    return triggers.find((x) => x.name === 'errors')?.lastOutcome ?? ''
  }))
}

t.test('three sidecars fire the same trigger: one rollback call, two followers naming the leader', async (t) => {
  const { fleet, cd } = await incidentSetup(t, [200])
  keepSending(t, fleet)
  t.ok(await eventually(async () => (await outcomes(fleet)).every((o) => o !== '' && o !== 'running'), 30_000), 'every sidecar fired and decided')
  await sleep(1500)
  t.equal(cd.deliveries.filter((d) => d.url === '/rollback').length, 1, 'exactly one rollback webhook call')
  const roles = await Promise.all(fleet.map(fleetRole))
  const leaders = roles.filter((r) => r?.role === 'leader')
  const followers = roles.filter((r) => r?.role === 'follower')
  t.equal(leaders.length, 1, 'one leader')
  t.equal(followers.length, 2, 'two followers')
  const leader = fleet[roles.findIndex((r) => r?.role === 'leader')] as TestSidecar
  for (const f of followers) t.equal(f?.leader, leader.sidecar.fleet?.instance, 'each follower names the leader')
  const out = await outcomes(fleet)
  t.equal(out.filter((o) => o.startsWith('follower:')).length, 2, 'followers say whom they follow')
  t.equal(out.filter((o) => o.startsWith('rollback ')).length, 1, 'the leader rolled back')
})

t.test('the leader goes before its rollback succeeded: a still-firing sidecar takes over and acts', async (t) => {
  // The first rollback call fails (no retries); the next succeeds.
  const { fleet, cd } = await incidentSetup(t, [500, 200])
  keepSending(t, fleet)
  t.ok(await eventually(() => cd.deliveries.length === 1, 30_000), 'the leader called the rollback webhook')
  t.ok(await eventually(async () => (await Promise.all(fleet.map(fleetRole))).filter((r) => r !== undefined).length === 3, 30_000), 'all three know their role')
  const roles = await Promise.all(fleet.map(fleetRole))
  const leaderIndex = roles.findIndex((r) => r?.role === 'leader')
  const leader = fleet[leaderIndex] as TestSidecar
  t.ok(await eventually(async () => ((await admin(leader.admin, 'GET', '/v1/state')).body.rollbacks as Array<{ status: string }>).some((r) => r.status === 'failed'), 30_000), 'its rollback failed')
  await sleep(500)
  t.equal(cd.deliveries.length, 1, 'nobody else acted while the leader lived')

  await leader.sidecar.close()
  const rest = fleet.filter((_s, i) => i !== leaderIndex)
  t.ok(await eventually(() => cd.deliveries.length >= 2, 30_000), 'a follower took over and called the rollback webhook')
  await sleep(1500)
  t.equal(cd.deliveries.length, 2, 'exactly one takeover')
  const after = await Promise.all(rest.map(fleetRole))
  t.equal(after.filter((r) => r?.role === 'leader').length, 1, 'one of the two is now the leader')
  t.ok(rest.some((s) => s.logs.some((l) => l.event === 'fleet_incident' && l.previousLeader === leader.sidecar.fleet?.instance)), 'the takeover names the leader that left')
})

t.test('the leader goes while the followers\' watch delivers nothing: their periodic read finds its key gone, and a still-firing sidecar takes over', async (t) => {
  // The first rollback call fails (no retries); the next succeeds.
  const { fleet, cd } = await incidentSetup(t, [500, 200])
  keepSending(t, fleet)
  t.ok(await eventually(() => cd.deliveries.length === 1, 30_000), 'the leader called the rollback webhook')
  t.ok(await eventually(async () => (await Promise.all(fleet.map(fleetRole))).filter((r) => r !== undefined).length === 3, 30_000), 'all three know their role')
  const leaderIndex = (await Promise.all(fleet.map(fleetRole))).findIndex((r) => r?.role === 'leader')
  const leader = fleet[leaderIndex] as TestSidecar
  t.ok(await eventually(async () => ((await admin(leader.admin, 'GET', '/v1/state')).body.rollbacks as Array<{ status: string }>).some((r) => r.status === 'failed'), 30_000), 'its rollback failed')
  const rest = fleet.filter((_s, i) => i !== leaderIndex)
  // The followers' watch streams deliver nothing more (as when the probe's read gets there
  // first, or the watch is being restarted): only the periodic read of the prefix can tell.
  type Handler = { event: (...args: unknown[]) => Promise<void> }
  for (const s of rest) (s.sidecar.fleet as unknown as Handler).event = async () => {}
  t.teardown(() => { for (const s of rest) delete (s.sidecar.fleet as unknown as Partial<Handler>).event })

  await leader.sidecar.close()
  t.ok(await eventually(() => cd.deliveries.length >= 2, 30_000), 'a follower took over and called the rollback webhook')
  await sleep(1500)
  t.equal(cd.deliveries.length, 2, 'exactly one takeover')
  t.ok(rest.some((s) => s.logs.some((l) => l.event === 'fleet_incident' && l.previousLeader === leader.sidecar.fleet?.instance)), 'the takeover names the leader that left')
})

t.test('etcd unreachable when the trigger fires: each sidecar acts alone, as without a fleet, and says why', async (t) => {
  const { fleet, cd, etcd } = await incidentSetup(t, [200])
  await etcd.kill(0)
  keepSending(t, fleet)
  t.ok(await eventually(() => cd.deliveries.length === 3, 60_000), 'three rollback calls: nobody could coordinate')
  for (const s of fleet) t.ok(s.logs.some((l) => l.event === 'fleet_incident' && /acts alone/.test(String(l.msg))), 'each says it acts alone')
})

interface EscalationView { id: string, trigger: string, status: string, escalateAt: string, escalatedAt: string | null, escalationReason: string | null, fleet?: { role: string, leader: string } }

async function incidentsOf (s: TestSidecar): Promise<EscalationView[]> {
  return ((await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as EscalationView[]).filter((i) => i.trigger === 'errors')
}

/**
 * Three sidecars whose upstream fails while `state.failing`, a rollback webhook answering
 * `respond`, a short escalation deadline, and a webhook receiver that sees every event.
 */
async function escalationSetup (t: Test, respond: number[], action = 'rollback', escalateAfter = '6s'): Promise<{ fleet: TestSidecar[], cd: Receiver, hook: Receiver, state: { failing: boolean } }> {
  const state = { failing: true }
  const app = await startUpstream((_req, res) => { res.writeHead(state.failing ? 500 : 200); res.end(state.failing ? 'broken release' : 'ok') })
  t.teardown(app.close)
  const cd = await startReceiver(respond)
  t.teardown(cd.close)
  const hook = await startReceiver([200])
  t.teardown(hook.close)
  const { fleet } = await startConnectedFleet(t, {
    version: '2.0.0',
    upstreams: { app: { url: app.url } },
    circuitBreakers: {}, // restoration is judged at once, not after an open circuit's recoveryTimeout
    rollback: { type: 'webhook', url: `${cd.url}/rollback`, retries: 0 },
    // minRequests 2: the traffic runs on one busy event loop with three sidecars; at 5 a stalled
    // loop thinned it below the volume for a whole window, the trigger re-armed as inconclusive
    // and fired again into the same incident (a second rollback attempt, a changed lastOutcome).
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 2, action }],
    notifications: { webhooks: [`${hook.url}/events`], escalateAfter },
    verification: { intervalMs: 150, successes: 1, windowMs: '2s', timeoutMs: '20s' }
  })
  return { fleet, cd, hook, state }
}

/** Wait until every running sidecar's escalation deadline for the incident is 2 s behind. */
async function pastEveryDeadline (fleet: TestSidecar[]): Promise<void> {
  const deadlines = (await Promise.all(fleet.map(incidentsOf))).flat().map((i) => Date.parse(i.escalateAt))
  await sleep(Math.max(0, Math.max(...deadlines) + 2000 - Date.now()))
}

function escalations (hook: Receiver): Array<{ at: number, body: any }> {
  return hook.deliveries.filter((d) => d.body?.event === 'escalated')
}

async function auditOf (s: TestSidecar): Promise<Array<{ action: string, requester: string }>> {
  return (await admin(s.admin, 'GET', '/v1/audit?limit=200')).body.entries as Array<{ action: string, requester: string }>
}

t.test('escalation in a fleet: an incident the leader restored in time escalates nowhere, and the followers record the restoration', async (t) => {
  const { fleet, cd, hook, state } = await escalationSetup(t, [200])
  keepSending(t, fleet)
  t.ok(await eventually(() => cd.deliveries.length >= 1, 30_000), 'the leader called the rollback webhook')
  state.failing = false // the rollback fixed it
  t.ok(await eventually(async () => (await Promise.all(fleet.map(incidentsOf))).every((list) => list[0]?.status === 'restored'), 30_000), 'every sidecar records the incident restored')
  await pastEveryDeadline(fleet)
  t.equal(escalations(hook).length, 0, 'no escalation from anyone')
  t.equal(hook.deliveries.filter((d) => d.body?.event === 'restoration_verified').length, 1, 'one restoration_verified, from the leader')
  const records = (await Promise.all(fleet.map(incidentsOf))).map((list) => list[0] as EscalationView)
  t.equal(records.filter((i) => i.fleet?.role === 'follower').length, 2, 'two followers')
  const audit = (await Promise.all(fleet.map(auditOf))).flat()
  t.notOk(audit.some((e) => e.action === 'incident.escalated'), 'no escalation audited anywhere')
  t.equal(audit.filter((e) => e.action === 'incident.restored' && e.requester.startsWith('fleet:')).length, 2, 'each follower audits the restoration its leader verified')
})

t.test('escalation in a fleet: the leader\'s rollback fails, and the fleet escalates exactly once', async (t) => {
  const { fleet, hook } = await escalationSetup(t, [500])
  keepSending(t, fleet)
  t.ok(await eventually(() => escalations(hook).length >= 1, 30_000), 'escalated')
  t.ok(await eventually(async () => (await Promise.all(fleet.map(incidentsOf))).every((list) => list[0]?.fleet !== undefined && list[0].escalatedAt !== null), 30_000), 'every sidecar records the escalation')
  await pastEveryDeadline(fleet)
  t.equal(escalations(hook).length, 1, 'one escalation for the fleet')
  const records = (await Promise.all(fleet.map(incidentsOf))).map((list) => list[0] as EscalationView)
  t.equal(records.filter((i) => i.fleet?.role === 'leader').length, 1, 'one leader')
  t.match(records.filter((i) => i.fleet?.role === 'follower').map((i) => i.escalationReason), [/escalated by the fleet leader/, /escalated by the fleet leader/], 'the followers say their leader escalated')
})

t.test('escalation in a fleet: a follower that takes over before the deadline escalates at the deadline of its own detection, once', async (t) => {
  // A trigger that only notifies restores nothing: its incident escalates at the deadline.
  const { fleet, hook } = await escalationSetup(t, [200], 'notify', '8s')
  keepSending(t, fleet)
  t.ok(await eventually(async () => (await Promise.all(fleet.map(incidentsOf))).every((list) => list[0]?.fleet !== undefined), 30_000), 'all three know their role')
  const roles = (await Promise.all(fleet.map(incidentsOf))).map((list) => list[0] as EscalationView)
  const leaderIndex = roles.findIndex((i) => i.fleet?.role === 'leader')
  t.ok(Date.now() < Date.parse((roles[leaderIndex] as EscalationView).escalateAt), 'the leader is still before its deadline')
  await (fleet[leaderIndex] as TestSidecar).sidecar.close()
  const rest = fleet.filter((_s, i) => i !== leaderIndex)
  t.ok(await eventually(async () => (await Promise.all(rest.map(incidentsOf))).some((list) => list[0]?.fleet?.role === 'leader'), 30_000), 'a follower took over')
  t.ok(await eventually(() => escalations(hook).length >= 1, 30_000), 'the incident escalated')
  await pastEveryDeadline(rest)
  t.equal(escalations(hook).length, 1, 'once')
  const taker = (await Promise.all(rest.map(incidentsOf))).map((list) => list[0] as EscalationView).find((i) => i.fleet?.role === 'leader') as EscalationView
  t.ok(taker.escalatedAt !== null && Date.parse(taker.escalatedAt) >= Date.parse(taker.escalateAt), 'at the deadline fixed at its detection, not earlier')
  t.equal(escalations(hook)[0]?.body.details.incident, taker.id, 'the new leader escalated its incident')
})

t.test('the leader leaves after its rollback, before restoration was verified: a follower carries the incident on, without a second rollback; it escalates at its deadline and verifies the restoration', async (t) => {
  const { fleet, cd, hook, state } = await escalationSetup(t, [200], 'rollback', '10s')
  keepSending(t, fleet)
  const key = incidentKey('shop', '2.0.0', 'errors')
  t.ok(await eventually(() => cd.deliveries.length >= 1, 30_000), 'the leader rolled back')
  // Every sidecar has seen the key say the leader acted (the rollback did not fix it: the upstream still fails).
  t.ok(await eventually(() => fleet.every((s) => s.sidecar.fleet?.holding(key)?.acted === true), 30_000), 'the key records the action')
  t.ok(await eventually(async () => (await Promise.all(fleet.map(incidentsOf))).every((list) => list[0]?.fleet !== undefined), 30_000), 'all three know their role')
  const roles = (await Promise.all(fleet.map(incidentsOf))).map((list) => list[0] as EscalationView)
  const leaderIndex = roles.findIndex((i) => i.fleet?.role === 'leader')
  const leader = (roles[leaderIndex] as EscalationView).fleet?.leader
  t.ok(Date.now() < Date.parse((roles[leaderIndex] as EscalationView).escalateAt), 'the leader leaves before its deadline')
  await (fleet[leaderIndex] as TestSidecar).sidecar.close()

  const rest = fleet.filter((_s, i) => i !== leaderIndex)
  const views = async (): Promise<Array<EscalationView & { mitigation: { id: string, action: string } | null }>> => (await Promise.all(rest.map(incidentsOf))).map((list) => list[0] as EscalationView & { mitigation: { id: string, action: string } | null })
  t.ok(await eventually(async () => (await views()).some((i) => i.fleet?.role === 'leader'), 30_000), 'a follower carries the incident on')
  const successor = (await views()).find((i) => i.fleet?.role === 'leader') as EscalationView & { mitigation: { id: string, action: string } | null }
  t.match(successor, { status: 'verifying', mitigation: { id: `fleet:${String(leader)}`, action: 'rollback' } }, 'verifying the leader\'s rollback')
  const name = successor.fleet?.leader
  t.ok(await eventually(async () => (await views()).every((i) => i.fleet?.leader === name), 30_000), 'the other follower follows it')
  t.match(rest.map((s) => s.sidecar.fleet?.holding(key)), [{ instance: name, acted: true }, { instance: name, acted: true }], 'the key, held by the successor, still says the incident was acted on')

  t.ok(await eventually(() => escalations(hook).length >= 1, 30_000), 'still failing: the incident escalated')
  t.equal(escalations(hook)[0]?.body.details.incident, successor.id, 'by the successor')
  t.ok(Date.now() >= Date.parse(successor.escalateAt), 'at its own deadline')

  state.failing = false
  t.ok(await eventually(async () => (await views()).every((i) => i.status === 'restored'), 30_000), 'restoration verified by the successor, recorded by the other follower')
  t.equal(hook.deliveries.filter((d) => d.body?.event === 'restoration_verified').length, 1, 'one restoration_verified, from the successor')
  t.equal(escalations(hook).length, 1, 'one escalation')
  t.equal(cd.deliveries.length, 1, 'one rollback: nobody acted again')
})
