/**
 * One incident, one actor (SPEC §16), on a real etcd: three sidecars fire the same trigger,
 * exactly one (the one that creates the incident key under its lease) calls the rollback
 * webhook; the others follow it, visibly. When the leader goes before its action succeeded,
 * a still-firing sidecar takes over.
 */
import t, { type Test } from 'tap'
import { startConnectedFleet } from './helpers/fleet.js'
import { startReceiver, type Receiver } from './helpers/receiver.js'
import { startUpstream } from './helpers/upstream.js'
import { admin } from './helpers/admin.js'
import { send, eventually, sleep } from './helpers/http.js'
import type { TestSidecar } from './helpers/sidecar.js'
import type { EtcdCluster } from './helpers/etcd.js'

async function incidentSetup (t: Test, respond: number[]): Promise<{ fleet: TestSidecar[], cd: Receiver, etcd: EtcdCluster }> {
  const failing = await startUpstream((_req, res) => { res.writeHead(500); res.end('broken release') })
  t.teardown(failing.close)
  const cd = await startReceiver(respond)
  t.teardown(cd.close)
  const { fleet, etcd } = await startConnectedFleet(t, {
    version: '2.0.0',
    upstreams: { app: { url: failing.url } },
    rollback: { type: 'webhook', url: `${cd.url}/rollback`, retries: 0 },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 5, action: 'rollback' }]
  })
  return { fleet, cd, etcd }
}

/** Keep failing traffic flowing through `fleet` until the test ends (triggers stay fired). */
function keepFiring (t: Test, fleet: TestSidecar[]): void {
  let stopped = false
  t.teardown(() => { stopped = true })
  void (async () => {
    while (!stopped) {
      await Promise.all(fleet.map(async (s) => { if (s.sidecar.addresses.proxy !== '') await send(s.proxy, '/other').catch(() => null) }))
      await sleep(50)
    }
  })()
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
  keepFiring(t, fleet)
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
  keepFiring(t, fleet)
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

t.test('etcd unreachable when the trigger fires: each sidecar acts alone, as without a fleet, and says why', async (t) => {
  const { fleet, cd, etcd } = await incidentSetup(t, [200])
  await etcd.kill(0)
  keepFiring(t, fleet)
  t.ok(await eventually(() => cd.deliveries.length === 3, 60_000), 'three rollback calls: nobody could coordinate')
  for (const s of fleet) t.ok(s.logs.some((l) => l.event === 'fleet_incident' && /acts alone/.test(String(l.msg))), 'each says it acts alone')
})
