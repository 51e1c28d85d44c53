/**
 * Fleet writes racing the fleet's own watch (SPEC §16): the watch of the sidecar that writes
 * may deliver its write, and a newer one from another sidecar, before etcd's answer to the write
 * comes back. Each test holds the writer's answer until its watch has applied what the race
 * needs, so the interleaving that happens now and then in production happens every run.
 */
import t from 'tap'
import { startConnectedFleet, holdIncidentEvents } from './helpers/fleet.js'
import { startReceiver } from './helpers/receiver.js'
import { admin } from './helpers/admin.js'
import { startUpstream } from './helpers/upstream.js'
import { eventually, send, sleep } from './helpers/http.js'
import type { TestSidecar } from './helpers/sidecar.js'
import type { FleetWriter } from '../src/control/interfaces.js'
import type { Fleet } from '../src/fleet/fleet.js'
import { incidentKey } from '../src/control/notify.js'

/**
 * Make `s`'s fleet writes answer only once `then` (given what was written) has run: the etcd
 * write itself is the real one.
 */
function holdWrites (s: TestSidecar, then: (name: string, value: unknown) => Promise<void>): void {
  const fleet = s.sidecar.fleet as FleetWriter
  const write = fleet.write.bind(fleet)
  fleet.write = async (kind, name, entry) => {
    const revision = await write(kind, name, entry)
    await then(name, entry.value)
    return revision
  }
}

async function status (s: TestSidecar): Promise<number> {
  return (await send(s.proxy, '/checkout/pay')).status
}

t.test('a fleet restore whose own watch event lands before etcd answers the write still announces the kill switch lifted', async (t) => {
  const hooks = await startReceiver()
  t.teardown(hooks.close)
  const { fleet } = await startConnectedFleet(t, { notifications: { webhooks: [hooks.url] } })
  const [s0] = fleet
  t.equal((await admin(s0.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'bad release', scope: 'fleet' })).status, 200)
  t.ok(await eventually(() => hooks.deliveries.some((d) => d.body?.event === 'mitigation_applied'), 10_000), 'the kill was announced')

  // The restore's answer waits until s0's own watch has applied the restore.
  holdWrites(s0, async (name) => {
    if (!await eventually(() => s0.sidecar.control.state.fleet.flags[name]?.value === null, 10_000)) throw new Error('the watch did not deliver the write')
  })
  const restore = await admin(s0.admin, 'DELETE', '/v1/flags/newCheckout', { reason: 'fixed', scope: 'fleet' })
  t.equal(restore.status, 200, JSON.stringify(restore.body))
  t.equal(await status(s0), 200, 'restored')
  t.ok(await eventually(() => hooks.deliveries.some((d) => d.body?.event === 'mitigation_lifted'), 10_000), 'the end of the kill switch was announced')
  await sleep(500)
  t.equal(hooks.deliveries.filter((d) => d.body?.event === 'mitigation_lifted').length, 1, 'once')
})

t.test('a newer fleet decision from another sidecar that arrives while this one\'s write is awaited stays in force here', async (t) => {
  const { fleet } = await startConnectedFleet(t)
  const [s0, s1, s2] = fleet
  // s0 kills the flag fleet-wide; before etcd's answer reaches s0, s1 restores it (a second
  // operator, a few seconds later in real life) and s0's watch has applied that restore.
  holdWrites(s0, async (name) => {
    const restore = await admin(s1.admin, 'DELETE', `/v1/flags/${name}`, { reason: 'false alarm', scope: 'fleet' })
    if (restore.status !== 200) throw new Error(`the second operator's restore failed: ${JSON.stringify(restore.body)}`)
    if (!await eventually(() => s0.sidecar.control.state.fleet.flags[name]?.value === null, 10_000)) throw new Error('the watch did not deliver the restore')
  })
  const kill = await admin(s0.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'bad release', scope: 'fleet' })
  t.equal(kill.status, 200, JSON.stringify(kill.body))
  // etcd holds the restore, the newest decision: every sidecar serves, the writer of the older one too.
  t.ok(await eventually(async () => await status(s1) === 200 && await status(s2) === 200, 10_000), 'the others follow etcd')
  t.equal(await status(s0), 200, 'the writer of the older decision follows etcd too, at once')
  await sleep(1500) // past a few probes of etcd: nothing puts the older decision back
  t.equal(await status(s0), 200, 'and still does')
  t.equal(s0.sidecar.control.state.fleet.flags.newCheckout?.value, null, 'its fleet state is etcd\'s')
  t.equal((await admin(s0.admin, 'GET', '/v1/state')).body.flags.newCheckout.origin, 'config')
})

t.test('a fleet failover lifted from another sidecar while the failover\'s write is awaited ends on its writer too', async (t) => {
  const answer = (name: string, code: number) => (_req: unknown, res: { writeHead: (c: number) => void, end: (b: string) => void }): void => { res.writeHead(code); res.end(name) }
  const primary = await startUpstream(answer('primary', 503))
  const dr = await startUpstream(answer('dr', 200))
  t.teardown(primary.close)
  t.teardown(dr.close)
  const { fleet } = await startConnectedFleet(t, {
    upstreams: { primary: { url: primary.url }, dr: { url: dr.url } },
    circuitBreakers: {},
    routes: [{ name: 'orders', match: { pathPrefix: '/' }, upstream: 'primary' }]
  })
  const [s0, s1] = fleet
  const served = async (s: TestSidecar): Promise<string> => (await send(s.proxy, '/orders/1')).body
  holdWrites(s0, async (upstream, value) => {
    if (value === null || !await eventually(() => s1.sidecar.control.state.fleet.failovers[upstream]?.value === value, 10_000)) throw new Error('s1 did not see the failover')
    const lift = await admin(s1.admin, 'DELETE', `/v1/mitigations/${String(s1.sidecar.control.state.fleet.failovers[upstream]?.id)}`, { reason: 'primary back' })
    if (lift.status !== 200) throw new Error(`the lift failed: ${JSON.stringify(lift.body)}`)
    if (!await eventually(() => s0.sidecar.control.state.fleet.failovers[upstream]?.value === null, 10_000)) throw new Error('the watch did not deliver the lift')
  })
  const res = await admin(s0.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], to: 'dr', reason: 'primary db down', scope: 'fleet' })
  t.equal(res.status, 201, JSON.stringify(res.body))
  t.ok(await eventually(async () => await served(s1) === 'primary', 10_000), 'lifted where it was lifted')
  t.equal(await served(s0), 'primary', 'and on the writer, whose write the lift came after')
  await sleep(1500)
  t.equal(await served(s0), 'primary', 'for good')
})

t.test('the holder\'s own watch event for an older write of its incident key, arriving after the answer to a newer one, does not put the older value back: its next progress still lands', async (t) => {
  const { fleet } = await startConnectedFleet(t)
  const f = (fleet[0] as TestSidecar).sidecar.fleet as Fleet
  const key = incidentKey('shop', '2.0.0', 'errors')
  // Its watch's events for incident keys are handed on one by one, late, as a busy stream would.
  const { late, release } = holdIncidentEvents(t, fleet[0] as TestSidecar)

  t.match(await f.claim(key, 'errors'), { leader: true }, 'this sidecar holds the incident')
  await f.progress(key, { acted: true })
  const escalatedAt = new Date().toISOString()
  await f.progress(key, { escalatedAt })
  t.ok(await eventually(() => late.length >= 3, 10_000), 'the watch saw the three writes')
  // The events of the claim and of the first progress arrive now, after the answer to the second.
  for (const event of late.splice(0, 2)) event()
  const restoredAt = new Date().toISOString()
  await f.progress(key, { restoredAt })
  t.match(await f.read(key), { acted: true, escalatedAt, restoredAt }, 'etcd holds the restoration, with what came before it')

  // etcd holds a value of this holder's that it has not seen yet (its event still held): the
  // compare fails, and the write goes over what etcd holds, since it is still this holder's.
  const raw = f as unknown as { client: { range: (key: string) => Promise<{ kvs: Array<{ value: string }> }>, put: (key: string, value: string) => Promise<number> }, key: (kind: string, name: string) => string }
  const path = raw.key('incidents', key)
  const stored = JSON.parse((await raw.client.range(path)).kvs[0]?.value ?? '{}') as Record<string, unknown>
  await raw.client.put(path, JSON.stringify({ ...stored, announcedAt: new Date().toISOString() }))
  await f.progress(key, { statusPage: { id: 'page-1', status: 'resolved' } })
  release()
  t.match(await f.read(key), { restoredAt, announcedAt: String, statusPage: { id: 'page-1' } }, 'etcd holds both: the change it had not seen, and this progress')
})
