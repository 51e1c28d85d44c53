/**
 * The fleet layer when etcd misbehaves (SPEC §16), on a real etcd: down at start, killed
 * mid-run, one member of three lost, a stalled (frozen) member, a corrupt value. Sidecars keep
 * proxying and stay ready, keep (and persist) the last fleet state, report
 * `breakwater_fleet_connected`, log once per change of state, answer fleet writes with 503, and
 * resync without missing a change made while they were away.
 */
import t, { type Test } from 'tap'
import { rmSync } from 'node:fs'
import { Etcd3 } from 'etcd3'
import { startEtcd } from './helpers/etcd.js'
import { fleetConfig, startFleet, startConnectedFleet } from './helpers/fleet.js'
import { startCaptured, testSidecarInput, TEST_TOKEN, type TestSidecar } from './helpers/sidecar.js'
import { runCli } from './helpers/process.js'
import { send, eventually, sleep } from './helpers/http.js'
import { admin } from './helpers/admin.js'
import { metricValue } from './helpers/metrics.js'
import { startUpstream } from './helpers/upstream.js'
import { startSlowLink } from './helpers/slow-link.js'
import { resolveConfig } from '../src/config/load.js'

const KEY = '/bw-test/shop/flags/newCheckout'

/** A fleet override as another sidecar (or an operator's tool) would write it. */
function entry (value: boolean | null, reason: string): string {
  return JSON.stringify({ value, reason, requester: 'elsewhere', at: new Date().toISOString(), ttlMs: null, expiresAt: null, instance: 'other' })
}

function etcdClient (t: Test, hosts: string[]): Etcd3 {
  const client = new Etcd3({ hosts })
  t.teardown(() => { client.close() })
  return client
}

async function checkout (s: TestSidecar): Promise<number> {
  return (await send(s.proxy, '/checkout/pay')).status
}

async function everywhere (fleet: TestSidecar[], check: (s: TestSidecar) => Promise<boolean>): Promise<boolean> {
  return await eventually(async () => (await Promise.all(fleet.map(check))).every(Boolean), 30_000, 50)
}

const gauge = async (s: TestSidecar): Promise<number> => await metricValue(s.ops, 'breakwater_fleet_connected')

/** The "etcd unreachable" lines a sidecar logged. */
function lostLines (s: TestSidecar): number {
  return s.logs.filter((l) => l.event === 'fleet' && l.connected === false).length
}

t.test('etcd down at start: the sidecar serves and is ready, its /ready warning that etcd is unreachable; once etcd is up it syncs what is there, and the warning ends', async (t) => {
  const etcd = await startEtcd(t, 1, { start: false })
  const up = await startUpstream()
  t.teardown(up.close)
  const fleet = await startFleet(t, up.url, etcd.endpoints)
  const [s0] = fleet
  if (s0 === undefined) throw new Error('no sidecar')
  t.equal(await checkout(s0), 200, 'proxying without etcd')
  t.equal((await send(s0.ops, '/ready')).status, 200, 'ready without etcd')
  // Every sidecar must have seen the outage before etcd comes up (the last one started may
  // not have tried yet when the first has logged it).
  t.ok(await everywhere(fleet, async (s) => await gauge(s) === 0 && lostLines(s) === 1), 'gauge 0 and one log line, on every sidecar')
  const ready = await send(s0.ops, '/ready')
  t.equal(ready.status, 200, 'still ready')
  t.match(JSON.parse(ready.body).warnings, [{ fleet: 'etcd', error: String, message: /etcd\) is unreachable since .*last fleet state stays in force/, since: String }], '/ready says the fleet link is down, and since when')
  const status = await runCli(['status', '--admin', s0.admin], { env: { BREAKWATER_ADMIN_TOKEN: TEST_TOKEN, BREAKWATER_CONFIG: undefined, NODE_OPTIONS: undefined }, timeoutMs: 60_000 })
  t.equal(status.code, 0, status.stderr)
  t.match(status.stdout, /^shop .* — health ok\nwarning: the fleet store \(etcd\) is unreachable since /, 'breakwater status says so under its first line')
  const refused = await admin(s0.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'x', scope: 'fleet' })
  t.equal(refused.status, 503)
  t.equal(refused.body.error, 'fleet_unavailable')
  t.match(refused.body.message, /etcd\) is unreachable.*local actions still work/)

  await etcd.restart(0)
  await etcdClient(t, etcd.endpoints).put(KEY).value(entry(false, 'written while they could not see etcd'))
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 503), 'every sidecar applied it once connected')
  t.ok(await everywhere(fleet, async (s) => await gauge(s) === 1), 'gauge 1')
  t.equal(JSON.parse((await send(s0.ops, '/ready')).body).warnings, undefined, 'and /ready warns no more')
  for (const s of fleet) {
    t.equal(lostLines(s), 1, 'one "unreachable" line for the whole outage, not one per retry')
    t.equal(s.logs.filter((l) => l.event === 'fleet' && l.connected === true).length, 1, 'and one "connected" line')
  }
})

t.test('etcd lost mid-run: last state kept and persisted, gauge 0, one line, 503 for fleet writes; a change made while away arrives on reconnect', async (t) => {
  // Three members; the sidecars know only the first, so losing it cuts them off while the
  // cluster (and an operator's tool on another member) goes on.
  const { etcd, up, fleet } = await startConnectedFleet(t, {}, 3, 'first')
  const [first, second] = etcd.endpoints as [string, string, string]
  const [s0, s1] = fleet
  t.equal((await admin(s0.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'bad release', scope: 'fleet' })).status, 200)
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 503))

  await etcd.kill(0)
  t.ok(await everywhere(fleet, async (s) => await gauge(s) === 0), 'gauge 0 everywhere')
  await sleep(3000) // several retries
  for (const s of fleet) {
    t.equal(lostLines(s), 1, 'logged once, not per retry')
    t.equal(await checkout(s), 503, 'the last fleet state stays in force')
    t.equal((await send(s.proxy, '/other')).status, 200, 'and proxying goes on')
    t.equal((await send(s.ops, '/ready')).status, 200, 'ready')
  }
  const refused = await admin(s1.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'x', scope: 'fleet' })
  t.equal(refused.status, 503)
  t.equal(refused.body.error, 'fleet_unavailable')
  const local = await admin(s1.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'local still works' })
  t.equal(local.status, 200)
  t.equal((await send(s1.proxy, '/other')).status, 503, 'the local action is in force')
  t.equal((await admin(s1.admin, 'PUT', '/v1/circuits/app', { state: 'auto', reason: 'done' })).status, 200)

  // A restart without etcd keeps the fleet state (stateDir).
  await s0.sidecar.close()
  const { config } = resolveConfig(testSidecarInput(fleetConfig(up.url, [first]), s0.stateDir))
  const again = await startCaptured(t, config, s0.stateDir, { instance: 's0' })
  t.equal(await checkout(again), 503, 'restarted without etcd, the fleet kill switch is still in force')
  t.equal((await admin(again.admin, 'GET', '/v1/state')).body.flags.newCheckout.origin, 'fleet')

  // While they are away, the fleet restores the flag through another member.
  await etcdClient(t, [second]).put(KEY).value(entry(true, 'fixed while they were cut off'))
  const back = [again, fleet[1], fleet[2]]
  t.equal(await checkout(again), 503, 'not seen yet')
  await etcd.restart(0)
  t.ok(await everywhere(back, async (s) => await checkout(s) === 200), 'the change made while away is applied on reconnect')
  t.ok(await everywhere(back, async (s) => await gauge(s) === 1))
})

t.test('one member of three killed: nothing changes', async (t) => {
  const { etcd, fleet } = await startConnectedFleet(t, {}, 3)
  await etcd.kill(0)
  // Writes and propagation go on through the other two.
  const res = await admin(fleet[0].admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'during a member loss', scope: 'fleet' })
  t.equal(res.status, 200, JSON.stringify(res.body))
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 503), 'applied on all three')
  await sleep(2000)
  for (const s of fleet) {
    t.equal(await gauge(s), 1, 'still connected')
    t.equal(lostLines(s), 0, 'no "unreachable" line')
  }
  await restoreAll(t, fleet)
})

/** Restore the flag for the fleet through a live member and check it is on everywhere. */
async function restoreAll (t: Test, fleet: TestSidecar[]): Promise<void> {
  const res = await admin((fleet[1] as TestSidecar).admin, 'DELETE', '/v1/flags/newCheckout', { reason: 'over', scope: 'fleet' })
  t.equal(res.status, 200, JSON.stringify(res.body))
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 200), 'restored everywhere')
}

t.test('a frozen member (the watch stalls): detected, proxying goes on, and the change made meanwhile arrives when it thaws', async (t) => {
  const { etcd, fleet } = await startConnectedFleet(t, {}, 3, 'first')
  const [, second] = etcd.endpoints as [string, string, string]
  etcd.pause(0)
  t.teardown(() => { etcd.resume(0) })
  await etcdClient(t, [second]).put(KEY).value(entry(false, 'while the watch was stalled'))
  t.ok(await everywhere(fleet, async (s) => await gauge(s) === 0), 'the stall is noticed: gauge 0')
  for (const s of fleet) t.equal((await send(s.proxy, '/other')).status, 200, 'proxying goes on')
  etcd.resume(0)
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 503), 'the change made during the stall is applied')
  t.ok(await everywhere(fleet, async (s) => await gauge(s) === 1))
})

t.test('a fleet write just after etcd stalls is answered 503 after one attempt, not after seconds of retries', async (t) => {
  // Operators never wait (SPEC §15): the sidecar still counts itself connected (the stall is
  // not noticed yet), so the write is tried: once per member, not retried for 4 s.
  const { etcd, fleet } = await startConnectedFleet(t, {}, 1)
  const [s0] = fleet
  etcd.pause(0)
  t.teardown(() => { etcd.resume(0) })
  const refused = await admin(s0.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'x', scope: 'fleet' })
  t.equal(refused.status, 503)
  t.equal(refused.body.error, 'fleet_unavailable')
  t.match(refused.body.message, /\(no answer within 1000 ms\)/, 'one attempt of 1 s, said as such')
  const local = await admin(s0.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'local still works' })
  t.equal(local.status, 200, 'the local action works meanwhile')
  etcd.resume(0)
  t.ok(await everywhere(fleet, async (s) => await gauge(s) === 1), 'connected again once it thaws')
})

t.test('a watch that stops delivering while etcd answers: the probe applies what it missed and restarts the watch', async (t) => {
  const { etcd, fleet } = await startConnectedFleet(t)
  // The watch streams stay open but deliver nothing more (as a stuck stream would). The
  // sidecar's handler is silenced rather than one watcher's listeners: a sidecar that has just
  // connected may still replace its first watcher.
  type Handler = { event: (...args: unknown[]) => Promise<void> }
  for (const s of fleet) (s.sidecar.fleet as unknown as Handler).event = async () => {}
  await etcdClient(t, etcd.endpoints).put(KEY).value(entry(false, 'the watch never told them'))
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 503), 'applied from the probe\'s read')
  const fellBehind = (s: TestSidecar): number => s.logs.filter((l) => l.event === 'fleet' && l.msg === 'fleet: the watch fell behind etcd; state re-read and the watch restarted').length
  for (const s of fleet) {
    // The line follows the applied change (which a request may see first).
    t.ok(await eventually(() => fellBehind(s) > 0, 30_000), 'the stall is reported')
    t.equal(fellBehind(s), 1, 'said once')
    t.equal(lostLines(s), 0, 'etcd was never unreachable')
    t.equal(await gauge(s), 1)
  }
  // The restarted watch delivers again.
  for (const s of fleet) delete (s.sidecar.fleet as unknown as Partial<Handler>).event
  await etcdClient(t, etcd.endpoints).put(KEY).value(entry(true, 'back on'))
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 200))
})

t.test('a lot of data under the service\'s prefix that is not Breakwater\'s (12 values of 1 MiB), over a slow link to etcd: the link stays up, and fleet writes still reach every sidecar', async (t) => {
  const etcd = await startEtcd(t)
  const up = await startUpstream()
  t.teardown(up.close)
  // 2 MiB/s from etcd to each connection: what a probe costs shows in its time.
  const link = await startSlowLink(t, etcd.endpoints[0] as string, 2 * 1024 * 1024)
  const fleet = await startFleet(t, up.url, [link.url])
  t.ok(await everywhere(fleet, async (s) => await gauge(s) === 1), 'connected')
  const client = etcdClient(t, etcd.endpoints)
  const big = 'x'.repeat(1024 * 1024)
  for (let i = 0; i < 12; i++) await client.put(`/bw-test/shop/notes/n${i}`).value(big)
  // Several probes (one every 500 ms with this lease ttl) go by while the data is there.
  await sleep(8000)
  for (const s of fleet) {
    t.equal(lostLines(s), 0, 'etcd was never taken for unreachable')
    t.equal(await gauge(s), 1)
  }
  await client.put(KEY).value(entry(false, 'written beside the notes'))
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 503), 'a fleet override is still applied everywhere')
  await client.put(KEY).value(entry(true, 'back on'))
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 200))
})

t.test('a corrupt value under the prefix is ignored with a warning and a counter; the last good one stays', async (t) => {
  const { etcd, fleet } = await startConnectedFleet(t)
  t.equal((await admin(fleet[0].admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'bad release', scope: 'fleet' })).status, 200)
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 503))
  const client = etcdClient(t, etcd.endpoints)
  await client.put(KEY).value('{not json')
  await client.put('/bw-test/shop/circuits/app').value(JSON.stringify({ value: 'sideways', at: 'yesterday' }))
  t.ok(await everywhere(fleet, async (s) => await metricValue(s.ops, 'breakwater_fleet_corrupt_values_total') === 2), 'counted on each sidecar')
  for (const s of fleet) {
    t.equal(await checkout(s), 503, 'the last good value stays in force')
    t.equal((await send(s.proxy, '/other')).status, 200, 'the corrupt circuit value changed nothing')
    t.equal(s.logs.filter((l) => l.event === 'fleet_corrupt_value').length, 2, 'one warning per bad value')
    t.equal(await gauge(s), 1)
  }
  // A good value afterwards is applied as usual.
  await client.put(KEY).value(entry(true, 'fixed'))
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 200))
})

t.test('etcd back with older data (rebuilt empty, or restored from a backup): a fleet write after it reaches every sidecar', async (t) => {
  const { etcd, fleet } = await startConnectedFleet(t)
  // Revisions the sidecars have seen, higher than the rebuilt store will be at for a while.
  const client = etcdClient(t, etcd.endpoints)
  for (let i = 0; i < 30; i++) await client.put('/elsewhere/busy').value(String(i))
  const high = Number((await client.get('/elsewhere/busy').exec()).header.revision)
  t.ok(await eventually(() => fleet.every((s) => s.sidecar.control.state.fleet.revision >= high), 30_000), 'every sidecar has seen the revision')
  client.close()

  await etcd.kill(0)
  rmSync(etcd.members[0]?.dataDir as string, { recursive: true, force: true })
  await etcd.restart(0)
  t.ok(await everywhere(fleet, async (s) => await gauge(s) === 1), 'connected to the rebuilt store')

  const res = await admin(fleet[1].admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'after the rebuild', scope: 'fleet' })
  t.equal(res.status, 200, JSON.stringify(res.body))
  t.ok(await everywhere(fleet, async (s) => await checkout(s) === 503), 'in force on every sidecar, not only on the writer')
  await restoreAll(t, fleet)
})
