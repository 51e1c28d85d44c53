/**
 * Takeover after a crashed leader (SPEC §16), on a real etcd: the leader is the real binary
 * (`breakwater start`) in a child process; it fires, creates the incident key under its lease
 * and calls a rollback webhook that never answers. It is then killed with SIGKILL, so nothing
 * revokes its lease: the key stays until the lease's ttl runs out, and only then does a
 * still-firing follower take over and call the rollback, once.
 */
import t, { type Test } from 'tap'
import { Etcd3 } from 'etcd3'
import { fleetConfig } from './helpers/fleet.js'
import { startEtcd } from './helpers/etcd.js'
import { startTestSidecar, TEST_TOKEN, type TestSidecar } from './helpers/sidecar.js'
import { startProcess, withoutTapHooks } from './helpers/process.js'
import { startReceiver } from './helpers/receiver.js'
import { startUpstream } from './helpers/upstream.js'
import { admin } from './helpers/admin.js'
import { metricValue } from './helpers/metrics.js'
import { send, sleep } from './helpers/http.js'
import { incidentKey } from '../src/control/notify.js'

t.setTimeout(180_000)

/** Poll `check` until it holds; the test's own timeout is the only bound. */
async function until (check: () => boolean | Promise<boolean>, everyMs = 50): Promise<void> {
  while (!await check()) await sleep(everyMs)
}

/** Failing requests through `proxies` until `done()` holds (each request may fail on its own). */
async function fireUntil (proxies: string[], done: () => boolean | Promise<boolean>): Promise<void> {
  await until(async () => {
    await Promise.all(proxies.map(async (p) => await send(p, '/other').catch(() => null)))
    return await done()
  })
}

/** Keep failing traffic flowing through `fleet` until the test ends (their triggers stay fired). */
function keepFiring (t: Test, fleet: TestSidecar[]): void {
  let stopped = false
  t.teardown(() => { stopped = true })
  void fireUntil(fleet.map((s) => s.proxy), () => stopped)
}

interface Holding { instance: string, acted: boolean }
interface IncidentView { trigger: string, fleet?: { role: string, leader: string } }

/**
 * A fleet's etcd (and a client to read its keys), a failing release, a receiver that takes every
 * call and never answers (`stuck`, the leader's) and one that answers 200 (`cd`).
 */
async function takeoverScene (t: Test): Promise<{ etcd: Awaited<ReturnType<typeof startEtcd>>, client: Etcd3, failing: Awaited<ReturnType<typeof startUpstream>>, stuck: Awaited<ReturnType<typeof startReceiver>>, cd: Awaited<ReturnType<typeof startReceiver>> }> {
  const etcd = await startEtcd(t)
  const client = new Etcd3({ hosts: etcd.endpoints })
  t.teardown(() => { client.close() })
  const failing = await startUpstream((_req, res) => { res.writeHead(500); res.end('broken release') })
  t.teardown(failing.close)
  const stuck = await startReceiver([200])
  stuck.delayMs = 2 ** 31 - 1
  t.teardown(stuck.close)
  const cd = await startReceiver([200])
  t.teardown(cd.close)
  return { etcd, client, failing, stuck, cd }
}

async function fleetRole (s: TestSidecar): Promise<IncidentView['fleet'] | undefined> {
  const incidents = (await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as IncidentView[]
  return incidents.find((i) => i.trigger === 'errors' && i.fleet !== undefined)?.fleet
}

t.test('the leader is killed (SIGKILL) before its rollback answered: after the lease ttl a follower takes over and rolls back once', async (t) => {
  // The leader's rollback receiver (stuck) takes the call and never answers; the followers' (cd) answers 200.
  const { etcd, client, failing, stuck, cd } = await takeoverScene(t)
  // Slack and webhooks of the whole fleet: the incident is announced on them once.
  const hooks = await startReceiver([200])
  t.teardown(hooks.close)
  const fired = (): number => hooks.deliveries.filter((d) => d.body?.event === 'trigger_fired').length

  const incident = (url: string): Record<string, unknown> => fleetConfig(failing.url, etcd.endpoints, {
    version: '2.0.0',
    rollback: { type: 'webhook', url: `${url}/rollback`, retries: 0, timeoutMs: '10m' },
    notifications: { webhooks: [`${hooks.url}/events`], slackChannel: '#incidents', slackWebhookUrl: `${hooks.url}/slack` },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 5, action: 'rollback' }]
  })
  const key = `/bw-test/shop/incidents/${incidentKey('shop', '2.0.0', 'errors')}`
  const holding = async (): Promise<Holding | null> => JSON.parse(await client.get(key).string() ?? 'null') as Holding | null

  const leader = await startProcess(t, incident(stuck.url), { ...withoutTapHooks, BREAKWATER_INSTANCE: 'crashed-leader', BREAKWATER_ADMIN_TOKEN: TEST_TOKEN })
  const followers = [
    await startTestSidecar(t, incident(cd.url), { instance: 'f1' }),
    await startTestSidecar(t, incident(cd.url), { instance: 'f2' })
  ]
  await until(async () => await metricValue(leader.ops, 'breakwater_fleet_connected') === 1)
  await until(() => followers.every((s) => s.sidecar.fleet?.connected === true))

  // Only the leader sees the bad release at first: it creates the incident key and calls the rollback.
  await fireUntil([leader.proxy], () => stuck.deliveries.length === 1)
  t.match(await holding(), { instance: 'crashed-leader', acted: false }, 'the leader holds the incident key, not acted on yet')
  t.equal(stuck.answered, 0, 'its rollback call has no answer')
  await until(async () => typeof (await holding() as { announcedAt?: string } | null)?.announcedAt === 'string')
  t.equal(fired(), 1, 'the leader announced the incident, and the key says so')

  // Then the others: they fire and follow the leader.
  keepFiring(t, followers)
  await until(async () => (await Promise.all(followers.map(fleetRole))).every((r) => r?.role === 'follower'))
  for (const f of followers) t.match(await fleetRole(f), { role: 'follower', leader: 'crashed-leader' }, 'each follower names the leader')
  t.equal(cd.deliveries.length, 0, 'nobody else acts while the leader lives')

  leader.child.kill('SIGKILL')
  await leader.exited
  const killedAt = Date.now()
  t.match(await holding(), { instance: 'crashed-leader' }, 'a crash revokes nothing: the key outlives the leader until its lease expires')

  await until(() => cd.deliveries.length >= 1)
  const tookOverMs = (cd.deliveries[0]?.at ?? 0) - killedAt
  t.comment(`takeover rollback call ${tookOverMs} ms after the SIGKILL (lease ttl 2 s)`)
  t.ok(tookOverMs > 0, 'the takeover came after the leader died')

  // The new leader's rollback succeeded and is recorded on the key: nobody takes over again.
  await until(async () => (await holding())?.acted === true)
  const after = await holding()
  const newLeader = followers.find((s) => s.sidecar.fleet?.instance === after?.instance)
  t.ok(newLeader !== undefined, `the incident key is held by a follower (${after?.instance ?? 'none'})`)
  const other = followers.find((s) => s !== newLeader) as TestSidecar
  await until(async () => (await fleetRole(other))?.leader === after?.instance)
  t.match(await fleetRole(newLeader as TestSidecar), { role: 'leader', leader: after?.instance }, 'the incident names the new leader on the new leader')
  t.match(await fleetRole(other), { role: 'follower', leader: after?.instance }, 'and on the remaining follower')
  t.equal(cd.deliveries.filter((d) => d.url === '/rollback').length, 1, 'exactly one rollback call after the takeover')
  t.equal(stuck.deliveries.length, 1, 'and the dead leader\'s one call, never answered')
  t.ok(followers.some((s) => s.logs.some((l) => l.event === 'fleet_incident' && l.previousLeader === 'crashed-leader')), 'the takeover names the leader that died')
  // Its announcement would have gone before its rollback's result, on the same lanes.
  await until(() => hooks.deliveries.some((d) => d.body?.event === 'mitigation_applied') && hooks.deliveries.filter((d) => d.url === '/slack').length >= 2)
  t.equal(fired(), 1, 'the incident is not announced again by the sidecar that took it over (webhooks)')
  t.equal(hooks.deliveries.filter((d) => d.url === '/slack' && String(d.body?.text).startsWith(':rotating_light:')).length, 1, 'nor on Slack')
  t.equal((await holding() as { announcedAt?: string } | null)?.announcedAt !== undefined, true, 'the key keeps the announcement')
})

t.test('a leader killed before its announcement was delivered: the sidecar that takes over announces the incident, once', async (t) => {
  // The leader's notifications and rollback (stuck) are taken and never answered; the others' are.
  const { etcd, client, failing, stuck, cd } = await takeoverScene(t)
  const config = (url: string): Record<string, unknown> => fleetConfig(failing.url, etcd.endpoints, {
    version: '2.0.0',
    rollback: { type: 'webhook', url: `${url}/rollback`, retries: 0, timeoutMs: '10m' },
    notifications: { webhooks: [`${url}/events`] },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 5, action: 'rollback' }]
  })
  const key = `/bw-test/shop/incidents/${incidentKey('shop', '2.0.0', 'errors')}`
  const holding = async (): Promise<(Holding & { announcedAt?: string }) | null> => JSON.parse(await client.get(key).string() ?? 'null') as (Holding & { announcedAt?: string }) | null

  const leader = await startProcess(t, config(stuck.url), { ...withoutTapHooks, BREAKWATER_INSTANCE: 'crashed-leader', BREAKWATER_ADMIN_TOKEN: TEST_TOKEN })
  const followers = [await startTestSidecar(t, config(cd.url), { instance: 'f1' })]
  await until(async () => await metricValue(leader.ops, 'breakwater_fleet_connected') === 1)
  await until(() => followers.every((s) => s.sidecar.fleet?.connected === true))
  await fireUntil([leader.proxy], () => stuck.deliveries.some((d) => d.url === '/rollback') && stuck.deliveries.some((d) => d.body?.event === 'trigger_fired'))
  t.match(await holding(), { instance: 'crashed-leader', acted: false }, 'the leader holds the key')
  t.equal((await holding())?.announcedAt, undefined, 'its announcement was never delivered, and the key says none was')
  keepFiring(t, followers)
  await until(async () => (await fleetRole(followers[0] as TestSidecar))?.role === 'follower')

  leader.child.kill('SIGKILL')
  await leader.exited
  await until(() => cd.deliveries.some((d) => d.body?.event === 'mitigation_applied'))
  t.equal(cd.deliveries.filter((d) => d.body?.event === 'trigger_fired').length, 1, 'the sidecar that took over announced the incident, once')
  await until(async () => typeof (await holding())?.announcedAt === 'string')
  t.match(await holding(), { instance: 'f1' }, 'and recorded it on the key it holds')
  // A receiver that honours Idempotency-Key takes the two announcements for one: the
  // successor names the incident by the id the leader wrote on the key.
  const leaders = stuck.deliveries.find((d) => d.body?.event === 'trigger_fired')?.headers['idempotency-key']
  const successors = cd.deliveries.find((d) => d.body?.event === 'trigger_fired')?.headers['idempotency-key']
  t.equal(successors, leaders, 'the announcement taken over has the leader\'s Idempotency-Key')
  t.ok(String(successors).includes(String((await holding() as { incident?: string } | null)?.incident)), 'which names the fleet\'s incident, as the key does')
})

t.test('a leader killed after Slack and a webhook took its announcement, PagerDuty not: the sidecar that takes over pages PagerDuty only', async (t) => {
  const { etcd, client, failing, stuck, cd } = await takeoverScene(t)
  // One Slack, one webhook and one PagerDuty for the whole fleet; PagerDuty holds the leader's page unanswered.
  const slack = await startReceiver([200])
  const hooks = await startReceiver([200])
  const pd = await startReceiver([202])
  pd.delayMs = 2 ** 31 - 1
  for (const r of [slack, hooks, pd]) t.teardown(r.close)
  const config = (rollbackUrl: string): Record<string, unknown> => fleetConfig(failing.url, etcd.endpoints, {
    version: '2.0.0',
    rollback: { type: 'webhook', url: `${rollbackUrl}/rollback`, retries: 0, timeoutMs: '10m' },
    notifications: { webhooks: [`${hooks.url}/events`], slackWebhookUrl: `${slack.url}/slack`, pagerDutyRoutingKey: 'rk-fleet', pagerDutyUrl: `${pd.url}/v2/enqueue` },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 5, action: 'rollback' }]
  })
  const key = `/bw-test/shop/incidents/${incidentKey('shop', '2.0.0', 'errors')}`
  const holding = async (): Promise<(Holding & { announcedAt?: string, announcedTo?: string[] }) | null> => JSON.parse(await client.get(key).string() ?? 'null') as (Holding & { announcedAt?: string, announcedTo?: string[] }) | null
  const fired = (r: Awaited<ReturnType<typeof startReceiver>>): number => r.deliveries.filter((d) => d.body?.event === 'trigger_fired' || d.body?.event_action === 'trigger' || /rotating_light/.test(String(d.body?.text))).length

  const leader = await startProcess(t, config(stuck.url), { ...withoutTapHooks, BREAKWATER_INSTANCE: 'crashed-leader', BREAKWATER_ADMIN_TOKEN: TEST_TOKEN })
  const followers = [await startTestSidecar(t, config(cd.url), { instance: 'f1' })]
  await until(async () => await metricValue(leader.ops, 'breakwater_fleet_connected') === 1)
  await until(() => followers.every((s) => s.sidecar.fleet?.connected === true))
  await fireUntil([leader.proxy], () => stuck.deliveries.some((d) => d.url === '/rollback') && fired(pd) === 1)
  // Slack and the webhook took the announcement, and the key says so; PagerDuty has not answered.
  await until(async () => (await holding())?.announcedTo?.length === 2)
  t.match(await holding(), { instance: 'crashed-leader', acted: false }, 'the leader holds the key')
  t.equal((await holding())?.announcedAt, undefined, 'not every receiver took the announcement')
  t.equal(fired(slack), 1)
  t.equal(fired(hooks), 1)
  keepFiring(t, followers)
  await until(async () => (await fleetRole(followers[0] as TestSidecar))?.role === 'follower')

  leader.child.kill('SIGKILL')
  await leader.exited
  pd.delayMs = 0
  await until(() => cd.deliveries.some((d) => d.url === '/rollback'))
  await until(() => fired(pd) === 2 && pd.answered >= 1)
  await until(async () => typeof (await holding())?.announcedAt === 'string')
  t.match(await holding(), { instance: 'f1' }, 'the sidecar that took over holds the key')
  t.equal(fired(pd), 2, 'PagerDuty, which never answered the leader, is paged by the sidecar that took over')
  t.equal(fired(slack), 1, 'Slack, which took the leader\'s announcement, is not sent it again')
  t.equal(fired(hooks), 1, 'nor is the webhook')
  t.same([...((await holding())?.announcedTo ?? [])].sort(), ['pagerduty', 'slack', (await holding())?.announcedTo?.find((r) => r.startsWith('webhook:'))].sort(), 'the key records every receiver that took it')
})

t.test('a leader frozen (SIGSTOP) past its lease ttl steps down when it resumes: it follows the sidecar that took over, and the fleet escalates once', async (t) => {
  const { etcd, client, failing, cd } = await takeoverScene(t)
  const hooks = await startReceiver([200])
  t.teardown(hooks.close)
  const escalated = (): Array<{ at: number, body: any }> => hooks.deliveries.filter((d) => d.body?.event === 'escalated')
  const config = fleetConfig(failing.url, etcd.endpoints, {
    version: '2.0.0',
    circuitBreakers: {},
    rollback: { type: 'webhook', url: `${cd.url}/rollback`, retries: 0 },
    notifications: { webhooks: [`${hooks.url}/events`], escalateAfter: '12s' },
    verification: { intervalMs: 150, successes: 1, windowMs: '2s', timeoutMs: '5m' },
    rollbackTriggers: [{ name: 'errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 2, action: 'rollback' }]
  })
  const key = `/bw-test/shop/incidents/${incidentKey('shop', '2.0.0', 'errors')}`
  const holding = async (): Promise<Holding | null> => JSON.parse(await client.get(key).string() ?? 'null') as Holding | null

  const leader = await startProcess(t, config, { ...withoutTapHooks, BREAKWATER_INSTANCE: 'frozen-leader', BREAKWATER_ADMIN_TOKEN: TEST_TOKEN })
  const leaderAdmin = String(leader.lines.find((l) => l.msg === 'listening')?.admin)
  const follower = await startTestSidecar(t, config, { instance: 'f1' })
  await until(async () => await metricValue(leader.ops, 'breakwater_fleet_connected') === 1)
  await until(() => follower.sidecar.fleet?.connected === true)

  // The leader fires first, rolls back (the release still fails after it) and says so on the key.
  await fireUntil([leader.proxy], () => cd.deliveries.length === 1)
  const rolledBackAt = Date.now()
  await until(async () => (await holding())?.acted === true)
  keepFiring(t, [follower])
  await until(async () => (await fleetRole(follower))?.role === 'follower')

  // Frozen past its lease's ttl: its key goes, and the follower carries the incident on.
  leader.child.kill('SIGSTOP')
  t.teardown(() => { leader.child.kill('SIGCONT') })
  await until(async () => (await fleetRole(follower))?.role === 'leader')
  t.match(await holding(), { instance: 'f1', acted: true }, 'the follower holds the key now')
  leader.child.kill('SIGCONT')

  // Past both escalation deadlines (the leader's, fixed at its detection, came first): one escalation, by the holder.
  await until(() => escalated().length >= 1)
  await sleep(Math.max(0, rolledBackAt + 12_000 + 3000 - Date.now()))
  t.equal(escalated().length, 1, 'the fleet escalates once')
  const held = ((await admin(follower.admin, 'GET', '/v1/incidents')).body.incidents as Array<{ id: string, trigger: string }>).find((i) => i.trigger === 'errors')
  t.equal(escalated()[0]?.body?.details?.incident, held?.id, 'by the sidecar holding the key')
  // The old leader learned it lost its lease, stepped down and follows the holder.
  t.match(await fleetRole({ admin: leaderAdmin } as unknown as TestSidecar), { role: 'follower', leader: 'f1' }, 'the old leader follows the sidecar that took over')
  t.ok(leader.lines.some((l) => l.event === 'fleet_incident' && /stepping down/.test(String(l.msg))), 'and says it stepped down')
  t.equal(await metricValue(leader.ops, 'breakwater_fleet_step_downs_total'), 1, 'and counts it')
  t.equal(cd.deliveries.length, 1, 'one rollback')
  t.match(await holding(), { instance: 'f1' }, 'the holder keeps the key')
})
