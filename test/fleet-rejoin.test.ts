/**
 * A fleet's incident leader restarts (SPEC §16, §19), on a real etcd: the incidents it led are
 * claimed again before their escalations are posted again. Taken over meanwhile, it follows
 * the new leader — which now keeps the fleet's escalation alert posted — and records the
 * leader's verified restoration; still its own, it holds the key under its new lease and
 * posts the escalation again as without a fleet. A restarted follower reads the key again and
 * follows whoever leads now.
 */
import t, { type Test } from 'tap'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Etcd3 } from 'etcd3'
import { fleetConfig } from './helpers/fleet.js'
import { startEtcd } from './helpers/etcd.js'
import { startTestSidecar, type TestSidecar } from './helpers/sidecar.js'
import { startReceiver, type Receiver } from './helpers/receiver.js'
import { startUpstream } from './helpers/upstream.js'
import { admin } from './helpers/admin.js'
import { send, sleep } from './helpers/http.js'
import { incidentKey } from '../src/control/notify.js'

t.setTimeout(180_000)

const KEY = `/bw-test/shop/incidents/${incidentKey('shop', '2.0.0', 'errors')}`

interface IncidentView { id: string, trigger: string, status: string, escalatedAt: string | null, fleet?: { role: string, leader: string } }
interface AmAlert { labels: Record<string, string>, annotations: Record<string, string>, endsAt?: string }

/** Poll `check` until it holds; the test's own timeout is the only bound. */
async function until (check: () => boolean | Promise<boolean>, everyMs = 50): Promise<void> {
  while (!await check()) await sleep(everyMs)
}

async function incident (s: TestSidecar): Promise<IncidentView | undefined> {
  return ((await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as IncidentView[]).find((i) => i.trigger === 'errors')
}

/** Requests through `s` every 30 ms until the test ends. */
function flowing (t: Test, s: TestSidecar): void {
  let on = true
  t.teardown(() => { on = false })
  void (async () => { while (on) { await send(s.proxy, '/other').catch(() => null); await sleep(30) } })()
}

/** The escalation alerts posted to `am` by `instance` (one per post). */
function escalationsBy (am: Receiver, instance: string): AmAlert[] {
  return am.deliveries.flatMap((d) => d.body as AmAlert[])
    .filter((a) => a.labels.alertname === 'BreakwaterIncidentEscalated' && a.annotations.instance === instance)
}

function stateDir (t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-rejoin-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

t.test('a leader restarted after a follower took its escalated incident over follows the new leader: no escalation of its own, the restoration recorded', async (t) => {
  const etcd = await startEtcd(t)
  const client = new Etcd3({ hosts: etcd.endpoints })
  t.teardown(() => { client.close() })
  const am = await startReceiver([200]) // Alertmanager's API as the sidecars see it: what each posts is what matters
  t.teardown(am.close)
  let healthy = false
  const up = await startUpstream((_req, res) => { res.writeHead(healthy ? 200 : 500); res.end() })
  t.teardown(up.close)
  // The first leader's rollback fails at once: nothing acted, the incident escalated at once.
  const broken = await startReceiver([500])
  t.teardown(broken.close)
  const cd = await startReceiver([200])
  t.teardown(cd.close)
  const config = (rollback: string, dir: string): Record<string, unknown> => fleetConfig(up.url, etcd.endpoints, {
    version: '2.0.0',
    stateDir: dir,
    circuitBreakers: {}, // no open circuit between the rollback and the restoration
    rollback: { type: 'webhook', url: `${rollback}/rollback`, retries: 0 },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 5, action: 'rollback' }],
    verification: { intervalMs: 150, successes: 1, windowMs: '2s', timeoutMs: '120s' },
    notifications: { escalateAfter: '1h', alertmanager: { urls: [am.url], repeatInterval: '200ms' } }
  })
  const dirA = stateDir(t)
  const a = await startTestSidecar(t, config(broken.url, dirA), { instance: 'a' })
  const b = await startTestSidecar(t, config(cd.url, stateDir(t)), { instance: 'b' })
  await until(() => a.sidecar.fleet?.connected === true && b.sidecar.fleet?.connected === true)

  // Only `a` sees the bad release at first: it leads, its rollback fails, it escalates.
  flowing(t, a)
  await until(async () => (await incident(a))?.escalatedAt != null)
  t.match(await incident(a), { status: 'detected', fleet: { role: 'leader', leader: 'a' } }, 'a leads the incident and escalated it')
  await until(() => escalationsBy(am, 'a').length > 0)
  // Then `b`: it follows, and records the leader's escalation instead of escalating.
  flowing(t, b)
  await until(async () => (await incident(b))?.escalatedAt != null)
  t.match(await incident(b), { fleet: { role: 'follower', leader: 'a' } }, 'b follows a')
  t.equal(escalationsBy(am, 'b').length, 0, 'a follower posts no escalation')

  // `a` stops: its lease goes, and with it the incident key; `b`, still firing, takes over and rolls back.
  const incidentId = (await incident(a))?.id
  await a.sidecar.close()
  await until(() => cd.deliveries.length >= 1)
  await until(async () => (await incident(b))?.fleet?.role === 'leader')
  t.match(JSON.parse(await client.get(KEY).string() ?? 'null'), { instance: 'b', acted: true }, 'b holds the incident key and acted')
  await until(() => escalationsBy(am, 'b').length >= 2)
  t.pass('the new leader keeps the fleet\'s escalation alert posted, re-posting it')
  t.equal(escalationsBy(am, 'b')[0]?.annotations.incident, (await incident(b))?.id, 'for its incident')

  // `a` comes back with its stateDir: the incident it led is claimed again, and b holds it.
  const postedByA = escalationsBy(am, 'a').length
  const a2 = await startTestSidecar(t, config(broken.url, dirA), { instance: 'a' })
  await until(async () => (await incident(a2))?.fleet?.role === 'follower')
  t.match(await incident(a2), { id: incidentId, fleet: { role: 'follower', leader: 'b' } }, 'the restarted sidecar follows the new leader')
  t.ok(a2.logs.some((l) => l.event === 'incident' && l.phase === 'following' && l.leader === 'b'), 'and logs it')
  await sleep(1000) // five repeat intervals: the held-back escalation would have been posted at start and re-posted
  t.equal(escalationsBy(am, 'a').length, postedByA, 'the restarted sidecar posts no escalation')

  // The new leader's rollback fixed it: it verifies, resolves the escalation, and tells the fleet.
  healthy = true
  await until(async () => (await incident(b))?.status === 'restored')
  await until(() => escalationsBy(am, 'b').some((x) => x.endsAt !== undefined && Date.parse(x.endsAt) <= Date.now()))
  t.pass('the new leader resolves the fleet\'s escalation')
  await until(async () => (await incident(a2))?.status === 'restored')
  t.pass('the restarted sidecar records the restoration the leader verified')
  t.equal(escalationsBy(am, 'a').length, postedByA, 'still without an escalation posted by the restarted sidecar')
})

t.test('a leader restarted while its incident key outlives the old process holds the key under its new lease and posts its escalation again', async (t) => {
  const etcd = await startEtcd(t)
  const client = new Etcd3({ hosts: etcd.endpoints })
  t.teardown(() => { client.close() })
  const am = await startReceiver([200])
  t.teardown(am.close)
  const up = await startUpstream((_req, res) => { res.writeHead(500); res.end() })
  t.teardown(up.close)
  const broken = await startReceiver([500])
  t.teardown(broken.close)
  const dir = stateDir(t)
  const config = fleetConfig(up.url, etcd.endpoints, {
    version: '2.0.0',
    stateDir: dir,
    rollback: { type: 'webhook', url: `${broken.url}/rollback`, retries: 0 },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 5, action: 'rollback' }],
    notifications: { escalateAfter: '1h', alertmanager: { urls: [am.url], repeatInterval: '200ms' } }
  })
  const a = await startTestSidecar(t, config, { instance: 'a' })
  await until(() => a.sidecar.fleet?.connected === true)
  flowing(t, a)
  await until(async () => (await incident(a))?.escalatedAt != null)
  const held = await client.get(KEY).string()
  t.match(JSON.parse(held ?? 'null'), { instance: 'a', acted: false }, 'a holds the key')
  await a.sidecar.close()

  // As after a crash: the key, as the old process left it, under a lease that process no longer keeps alive.
  const old = client.lease(60, { autoKeepAlive: false })
  await old.put(KEY).value(held ?? '')
  const oldLease = await old.grant()

  const a2 = await startTestSidecar(t, { ...config, stateDir: dir }, { instance: 'a' })
  await until(() => a2.logs.some((l) => l.event === 'fleet_incident' && l.role === 'leader'))
  t.match(await incident(a2), { fleet: { role: 'leader', leader: 'a' } }, 'still the leader')
  const kv = (await client.get(KEY).exec()).kvs[0]
  t.not(kv?.lease, oldLease, 'the key is held under the restarted sidecar\'s lease')
  t.equal(kv?.value.toString(), held, 'unchanged')
  await old.revoke()
  t.match(JSON.parse(await client.get(KEY).string() ?? 'null'), { instance: 'a' }, 'the old lease\'s end leaves the key held')

  const posted = escalationsBy(am, 'a').length
  await until(() => escalationsBy(am, 'a').length >= posted + 2)
  t.pass('the escalation is posted again, and re-posted')
  t.ok(a2.logs.some((l) => l.phase === 'escalation_resumed'), 'logged')
})

t.test('a follower restarted while its leader was succeeded follows the successor, and records the restoration it verifies', async (t) => {
  const etcd = await startEtcd(t)
  let healthy = false
  const up = await startUpstream((_req, res) => { res.writeHead(healthy ? 200 : 500); res.end() })
  t.teardown(up.close)
  const cd = await startReceiver([200]) // the rollback is applied, and does not fix the release until the test does
  t.teardown(cd.close)
  const config = (dir: string): Record<string, unknown> => fleetConfig(up.url, etcd.endpoints, {
    version: '2.0.0',
    stateDir: dir,
    circuitBreakers: {}, // no open circuit between the rollback and the restoration
    rollback: { type: 'webhook', url: `${cd.url}/rollback`, retries: 0 },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 5, action: 'rollback' }],
    verification: { intervalMs: 150, successes: 1, windowMs: '2s', timeoutMs: '120s' }
  })
  const dirF2 = stateDir(t)
  const l = await startTestSidecar(t, config(stateDir(t)), { instance: 'l' })
  const f1 = await startTestSidecar(t, config(stateDir(t)), { instance: 'f1' })
  const f2 = await startTestSidecar(t, config(dirF2), { instance: 'f2' })
  await until(() => [l, f1, f2].every((s) => s.sidecar.fleet?.connected === true))

  // `l` sees the bad release first, leads and rolls back; then the others follow it.
  flowing(t, l)
  await until(() => cd.deliveries.length >= 1)
  flowing(t, f1)
  flowing(t, f2)
  await until(async () => (await incident(f1))?.fleet?.leader === 'l' && (await incident(f2))?.fleet?.leader === 'l')
  const followed = (await incident(f2))?.id

  // `f2` stops; then `l` goes after its rollback, and `f1` carries the incident on.
  await f2.sidecar.close()
  await l.sidecar.close()
  await until(async () => (await incident(f1))?.fleet?.role === 'leader')

  const back = await startTestSidecar(t, config(dirF2), { instance: 'f2' })
  await until(async () => (await incident(back))?.fleet?.leader === 'f1')
  t.match(await incident(back), { id: followed, status: 'detected', fleet: { role: 'follower', leader: 'f1' } }, 'the restarted follower follows the successor')
  t.ok(back.logs.some((l) => l.event === 'fleet_incident' && l.leader === 'f1' && l.previousLeader === 'l'), 'and says whom it followed before')

  healthy = true
  await until(async () => (await incident(f1))?.status === 'restored')
  await until(async () => (await incident(back))?.status === 'restored')
  t.pass('it records the restoration the successor verified')
  t.equal(cd.deliveries.length, 1, 'one rollback')
})
