/**
 * The failover mitigation for the whole fleet (SPEC §16, §17), on a real etcd with real
 * upstreams: a failing primary, a healthy `dr` and a healthy `spare`. One write through one
 * sidecar sends the primary's traffic to the target on all three; the newest decision wins
 * against a local failover; a ttl lapses and a lift acts everywhere; the decision survives a
 * restart without etcd; a fleet write while etcd is down is a 503 and local failover still
 * works; a refused request writes nothing.
 */
import t, { type Test } from 'tap'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Etcd3 } from 'etcd3'
import { startConnectedFleet, fleetConfig } from './helpers/fleet.js'
import { startCaptured, startTestSidecar, testSidecarInput, TEST_TOKEN, type TestSidecar } from './helpers/sidecar.js'
import { startUpstream, type Handler, type TestUpstream } from './helpers/upstream.js'
import { send, eventually } from './helpers/http.js'
import { admin } from './helpers/admin.js'
import { metricValue } from './helpers/metrics.js'
import { runCli } from './helpers/process.js'
import { resolveConfig } from '../src/config/load.js'
import { StateFile } from '../src/state/state-file.js'

const KEY = '/bw-test/shop/failovers/primary'
const CLI_ENV = { BREAKWATER_ADMIN_TOKEN: TEST_TOKEN, BREAKWATER_CONFIG: undefined, NODE_OPTIONS: undefined }

/** An upstream that answers `${name} ${status}`. */
function answering (name: string, status: number): Handler {
  return (_req, res) => {
    res.writeHead(status, { 'content-type': 'text/plain' })
    res.end(`${name} ${status}`)
  }
}

interface Upstreams { primary: TestUpstream, dr: TestUpstream, spare: TestUpstream }

async function upstreams (t: Test): Promise<Upstreams> {
  const primary = await startUpstream(answering('primary', 503))
  const dr = await startUpstream(answering('dr', 200))
  const spare = await startUpstream(answering('spare', 200))
  for (const u of [primary, dr, spare]) t.teardown(u.close)
  return { primary, dr, spare }
}

/** The service's upstreams and one route to the primary (no configured failover: each failover names its target). */
function rungs (u: Upstreams): Record<string, unknown> {
  return {
    upstreams: { primary: { url: u.primary.url }, dr: { url: u.dr.url }, spare: { url: u.spare.url } },
    circuitBreakers: {},
    routes: [{ name: 'orders', match: { pathPrefix: '/' }, upstream: 'primary' }]
  }
}

async function fleetOf (t: Test, size: 1 | 3 = 1, knows: 'all' | 'first' = 'all'): Promise<{ u: Upstreams, fleet: [TestSidecar, TestSidecar, TestSidecar], etcd: Awaited<ReturnType<typeof startConnectedFleet>>['etcd'] }> {
  const u = await upstreams(t)
  const { etcd, fleet } = await startConnectedFleet(t, rungs(u), size, knows)
  return { u, fleet, etcd }
}

/** Who served a request through `s`: `dr` or `spare` (failed over), else `primary` (its 503, or a refusal on its behalf). */
async function servedBy (s: TestSidecar): Promise<string> {
  const r = await send(s.proxy, '/orders/1')
  const failover = r.headers['x-breakwater-failover']
  const who = r.body.split(' ')[0] ?? ''
  // The header names the upstream that served, and only a failed-over request carries it.
  if (failover !== undefined && failover !== who) return `mismatch: header ${String(failover)}, body ${r.body}`
  if (failover === undefined) return who === 'dr' || who === 'spare' ? `unmarked: ${r.body}` : 'primary'
  return who
}

async function everywhere (fleet: TestSidecar[], expected: string): Promise<boolean> {
  return await eventually(async () => (await Promise.all(fleet.map(servedBy))).every((x) => x === expected), 30_000, 50)
}

async function failoverActive (s: TestSidecar): Promise<number> {
  return await metricValue(s.ops, 'breakwater_failover_active', { upstream: 'primary' })
}

async function shown (s: TestSidecar): Promise<Array<Record<string, any>>> {
  return ((await admin(s.admin, 'GET', '/v1/state')).body.mitigations as Array<Record<string, any>>).filter((m) => m.action === 'failover')
}

async function audited (s: TestSidecar, action: string): Promise<Array<Record<string, any>>> {
  return ((await admin(s.admin, 'GET', '/v1/audit?limit=200')).body.entries as Array<Record<string, any>>).filter((e) => e.action === action)
}

function etcdClient (t: Test, hosts: string[]): Etcd3 {
  const client = new Etcd3({ hosts })
  t.teardown(() => { client.close() })
  return client
}

const failover = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({ action: 'failover', upstreams: ['primary'], to: 'dr', reason: 'primary db down', scope: 'fleet', ...extra })

t.test('a fleet failover through one sidecar is in force on all three; lifted from another sidecar, it ends on all three', async (t) => {
  const { fleet, etcd } = await fleetOf(t)
  const [s0, s1, s2] = fleet
  t.ok(await everywhere(fleet, 'primary'), 'before: the failing primary answers')

  const res = await admin(s0.admin, 'POST', '/v1/mitigations', failover())
  t.equal(res.status, 201, JSON.stringify(res.body))
  t.match(res.body, { action: 'failover', targets: ['primary'], to: 'dr', status: 'active', scope: 'fleet', expiresAt: null })
  const id = res.body.id as string
  t.ok(await everywhere(fleet, 'dr'), 'every sidecar sends the primary\'s traffic to dr, marked x-breakwater-failover')

  const stored = JSON.parse(await etcdClient(t, etcd.endpoints).get(KEY).string() ?? 'null')
  t.match(stored, { value: 'dr', reason: 'primary db down', instance: 's0', ttlMs: null, expiresAt: null, id }, 'one key in etcd, JSON like the other fleet entries')
  t.type(stored.at, 'string')
  t.type(stored.requester, 'string')

  for (const s of fleet) {
    t.ok(await eventually(async () => await failoverActive(s) === 1, 30_000), 'breakwater_failover_active{upstream="primary"} is 1')
    t.match(await shown(s), [{ id, origin: 'fleet', inForce: true, to: 'dr', scope: 'fleet', status: 'active' }], 'GET /v1/state shows it, with origin fleet and the same id')
  }
  t.equal((await audited(s0, 'mitigation.failover'))[0]?.scope, 'fleet', 'the writer audits the fleet failover')
  for (const s of [s1, s2]) t.ok(await eventually(async () => (await audited(s, 'fleet.failover')).some((e) => e.id === id && e.value === 'dr'), 30_000), 'every other sidecar audits what it applied')

  const status = await runCli(['status', '--admin', s2.admin], { env: CLI_ENV, timeoutMs: 60_000 })
  t.equal(status.code, 0, status.stderr)
  t.match(status.stdout, new RegExp(`${id}\\s+failover\\s+active\\s+primary → dr\\s+fleet`), 'breakwater status shows the fleet failover on a sidecar that did not write it')
  const one = await admin(s1.admin, 'GET', `/v1/mitigations/${id}`)
  t.equal(one.status, 200)
  t.match(one.body, { id, scope: 'fleet', to: 'dr' })

  // Lifted from a sidecar that did not write it: a newer decision in etcd, applied everywhere.
  const lift = await runCli(['lift', id, '--reason', 'primary db back', '--admin', s2.admin], { env: CLI_ENV, timeoutMs: 60_000 })
  t.equal(lift.code, 0, lift.stderr)
  t.match(lift.stdout, new RegExp(`mitigation ${id}: failover lifted — primary \\(fleet`))
  t.ok(await everywhere(fleet, 'primary'), 'the primary takes its traffic again on all three')
  for (const s of fleet) {
    t.ok(await eventually(async () => await failoverActive(s) === 0, 30_000), 'breakwater_failover_active back to 0')
    t.same(await shown(s), [], 'no longer shown as active')
  }
  const again = await admin(s0.admin, 'DELETE', `/v1/mitigations/${id}`, { reason: 'twice' })
  t.equal(again.status, 409, JSON.stringify(again.body))
  t.equal(again.body.error, 'not_active')
})

t.test('breakwater failover --fleet, lifted on the sidecar that wrote it; a ttl lapses on every sidecar', async (t) => {
  const { fleet } = await fleetOf(t)
  const [, s1] = fleet
  const cli = await runCli(['failover', 'primary', '--to', 'spare', '--fleet', '--reason', 'primary melting', '--admin', s1.admin], { env: CLI_ENV, timeoutMs: 60_000 })
  t.equal(cli.code, 0, cli.stderr)
  t.match(cli.stdout, /failover applied — primary → spare \(fleet: every sidecar of the service\)/)
  const id = /mitigation (\S+):/.exec(cli.stdout)?.[1] ?? ''
  t.ok(await everywhere(fleet, 'spare'), 'in force on all three')
  const lifted = await admin(s1.admin, 'DELETE', `/v1/mitigations/${id}`, { reason: 'done' })
  t.equal(lifted.status, 200, JSON.stringify(lifted.body))
  t.match(lifted.body, { id, status: 'lifted', scope: 'fleet', liftReason: 'done' })
  t.ok(await everywhere(fleet, 'primary'), 'lifted on all three')

  // With a ttl: in force everywhere, then over everywhere, each sidecar by its own clock.
  const timed = await admin(fleet[2].admin, 'POST', '/v1/mitigations', failover({ ttl: '2s' }))
  t.equal(timed.status, 201, JSON.stringify(timed.body))
  t.type(timed.body.expiresAt, 'string')
  // Applied everywhere (the audit says so, however briefly it was in force), then over everywhere.
  for (const s of [fleet[0], fleet[1]]) t.ok(await eventually(async () => (await audited(s, 'fleet.failover')).some((e) => e.id === timed.body.id && e.value === 'dr'), 30_000), 'applied on every other sidecar')
  t.ok(await everywhere(fleet, 'primary'), 'and over on all three once the ttl ran out')
  for (const s of fleet) {
    t.ok(await eventually(() => s.logs.some((l) => l.action === 'mitigation_expired' && l.scope === 'fleet' && l.id === timed.body.id), 30_000), 'each says it expired')
    t.ok(await eventually(async () => (await audited(s, 'mitigation.expire')).some((e) => e.id === timed.body.id && e.scope === 'fleet'), 30_000), 'and audits it')
  }
})

t.test('the newest decision wins between a local failover and the fleet one', async (t) => {
  const { fleet } = await fleetOf(t)
  const [s0, s1, s2] = fleet

  // Local first, then fleet: the fleet decision is newer and wins on s1 as well.
  const older = await admin(s1.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], to: 'spare', reason: 'this pod only' })
  t.equal(older.status, 201, JSON.stringify(older.body))
  t.equal(await servedBy(s1), 'spare')
  const fleetWrite = await admin(s0.admin, 'POST', '/v1/mitigations', failover())
  t.equal(fleetWrite.status, 201, JSON.stringify(fleetWrite.body))
  t.ok(await everywhere(fleet, 'dr'), 'the newer fleet failover wins over the older local one')
  const onS1 = await shown(s1)
  t.match(onS1.find((m) => m.id === older.body.id), { origin: 'local', inForce: false }, 'the local one is shown, overridden')
  t.match(onS1.find((m) => m.id === fleetWrite.body.id), { origin: 'fleet', inForce: true })

  // Then local again on s1: newer than the fleet's, so s1 goes to spare; the others stay on dr.
  const newer = await admin(s1.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], to: 'spare', reason: 'this pod, again' })
  t.equal(newer.status, 201)
  t.equal(await servedBy(s1), 'spare', 'the newer local decision wins on s1')
  t.equal(await servedBy(s0), 'dr', 's0 keeps the fleet decision')
  t.equal(await servedBy(s2), 'dr', 's2 too')

  // Lifting the newer local one hands s1 back to the fleet decision (newer than the older local one).
  t.equal((await admin(s1.admin, 'DELETE', `/v1/mitigations/${newer.body.id as string}`, { reason: 'done here' })).status, 200)
  t.equal(await servedBy(s1), 'dr')

  // Lifting the fleet failover is a decision newer than the old local record: no failover anywhere.
  t.equal((await admin(s0.admin, 'DELETE', `/v1/mitigations/${fleetWrite.body.id as string}`, { reason: 'primary back' })).status, 200)
  t.ok(await everywhere(fleet, 'primary'), 'back to the primary everywhere, s1 included')

  // A local failover made after the fleet lift is newer, and is in force on its sidecar.
  t.equal((await admin(s2.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], to: 'spare', reason: 'later, here' })).status, 201)
  t.equal(await servedBy(s2), 'spare')
  t.equal(await servedBy(s0), 'primary')
})

t.test('etcd down: the last fleet failover stays (across a restart), a fleet write is a 503, local failover still works', async (t) => {
  // Three members; the sidecars know only the first, so losing it cuts them off.
  const { u, fleet, etcd } = await fleetOf(t, 3, 'first')
  const [first] = etcd.endpoints as [string, string, string]
  const [s0, s1] = fleet
  const res = await admin(s0.admin, 'POST', '/v1/mitigations', failover())
  t.equal(res.status, 201, JSON.stringify(res.body))
  t.ok(await everywhere(fleet, 'dr'))

  await etcd.kill(0)
  t.ok(await eventually(async () => (await Promise.all(fleet.map(async (s) => await metricValue(s.ops, 'breakwater_fleet_connected')))).every((x) => x === 0), 30_000), 'cut off from etcd')
  t.ok(await everywhere(fleet, 'dr'), 'the last fleet failover stays in force')

  const refused = await admin(s1.admin, 'POST', '/v1/mitigations', failover({ to: 'spare' }))
  t.equal(refused.status, 503, JSON.stringify(refused.body))
  t.equal(refused.body.error, 'fleet_unavailable')
  const liftRefused = await admin(s1.admin, 'DELETE', `/v1/mitigations/${res.body.id as string}`, { reason: 'x' })
  t.equal(liftRefused.status, 503, 'a fleet lift needs etcd too')
  t.equal(liftRefused.body.error, 'fleet_unavailable')
  t.equal(await servedBy(s1), 'dr', 'nothing changed')
  const local = await admin(s1.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], to: 'spare', reason: 'local still works' })
  t.equal(local.status, 201, JSON.stringify(local.body))
  t.equal(await servedBy(s1), 'spare', 'the local failover is in force')

  // A restart without etcd keeps the fleet failover (stateDir).
  await s0.sidecar.close()
  const { config } = resolveConfig(testSidecarInput(fleetConfig(u.primary.url, [first], rungs(u)), s0.stateDir))
  const again = await startCaptured(t, config, s0.stateDir, { instance: 's0' })
  t.equal(await servedBy(again), 'dr', 'restarted without etcd, the fleet failover is still in force')
  t.match(await shown(again), [{ id: res.body.id, origin: 'fleet', inForce: true }])
  t.equal(await failoverActive(again), 1)
})

t.test('a refused fleet failover writes nothing; a corrupt value is ignored and counted; without fleet, a clear 400', async (t) => {
  const { u, fleet, etcd } = await fleetOf(t)
  const [s0] = fleet
  const refusals: Array<[Record<string, unknown>, number, string]> = [
    [failover({ upstreams: ['nope'] }), 400, 'unknown_upstream'],
    [failover({ to: 'nope' }), 400, 'unknown_upstream'],
    [failover({ to: undefined }), 400, 'no_failover_target'],
    [failover({ to: 'primary' }), 400, 'bad_request'],
    [failover({ upstreams: ['primary', 'spare'] }), 400, 'bad_request'],
    [failover({ reason: '' }), 400, 'bad_request'],
    [failover({ scope: 'galaxy' }), 400, 'bad_request'],
    [{ action: 'rateLimit', routes: ['orders'], requestsPerSecond: 5, reason: 'x', scope: 'fleet' }, 400, 'bad_request'],
    [{ action: 'killSwitch', flags: ['newCheckout'], reason: 'x', scope: 'fleet' }, 400, 'bad_request']
  ]
  for (const [body, code, error] of refusals) {
    const res = await admin(s0.admin, 'POST', '/v1/mitigations', body)
    t.equal(res.status, code, JSON.stringify(body))
    t.equal(res.body.error, error, res.body.message)
    t.type(res.body.message, 'string')
  }
  const client = etcdClient(t, etcd.endpoints)
  t.same(await client.getAll().prefix('/bw-test/shop/failovers/').keys(), [], 'nothing written to etcd')
  t.same(await audited(s0, 'mitigation.failover'), [], 'nothing applied')
  t.equal(await servedBy(s0), 'primary')

  // A value under failovers/ that is not a Breakwater failover: ignored, counted, the last good one stays.
  t.equal((await admin(s0.admin, 'POST', '/v1/mitigations', failover())).status, 201)
  t.ok(await everywhere(fleet, 'dr'))
  await client.put(KEY).value('{not json')
  await client.put('/bw-test/shop/failovers/dr').value(JSON.stringify({ value: 42, at: new Date().toISOString() }))
  t.ok(await eventually(async () => (await Promise.all(fleet.map(async (s) => await metricValue(s.ops, 'breakwater_fleet_corrupt_values_total')))).every((x) => x === 2), 30_000), 'counted on each sidecar')
  for (const s of fleet) {
    t.equal(await servedBy(s), 'dr', 'the last good value stays in force')
    t.equal(s.logs.filter((l) => l.event === 'fleet_corrupt_value').length, 2, 'one warning per bad value')
  }

  // Without a fleet section: the same 400 as for flags.
  const { fleet: _fleet, ...alone } = fleetConfig(u.primary.url, [], rungs(u))
  const single = await startTestSidecar(t, alone)
  const res = await admin(single.admin, 'POST', '/v1/mitigations', failover())
  t.equal(res.status, 400)
  t.equal(res.body.error, 'fleet_not_configured')
  t.equal(await servedBy(single), 'primary', 'nothing applied')
})

t.test('a state file from before fleet failovers still loads', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-test-'))
  t.teardown(() => { rmSync(dir, { recursive: true, force: true }) })
  const at = new Date().toISOString()
  writeFileSync(join(dir, 'state.json'), JSON.stringify({ version: 1, overrides: {}, circuits: {}, mitigations: [], versions: {}, configs: {}, rolledBack: {}, incidents: [], statusPage: {}, fleet: { revision: 7, flags: { newCheckout: { value: false, reason: 'old', requester: 'x', at, ttlMs: null, expiresAt: null, instance: 's9' } }, circuits: {} } }))
  const loaded = await new StateFile(dir).load()
  t.equal(loaded.error, null)
  t.equal(loaded.movedAside, null)
  t.same(loaded.state.fleet.failovers, {}, 'no fleet failovers yet')
  t.equal(loaded.state.fleet.revision, 7, 'the rest of the fleet state is kept')
  t.equal(loaded.state.fleet.flags.newCheckout?.reason, 'old')
})
