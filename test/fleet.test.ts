/**
 * Fleet overrides through a real etcd (SPEC §16): one write reaches every sidecar of the
 * service, the newest operator decision wins, a ttl lapses fleet-wide, and without `fleet`
 * the etcd client is never loaded.
 */
import t from 'tap'
import { spawn } from 'node:child_process'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { Etcd3 } from 'etcd3'
import { startUpstream } from './helpers/upstream.js'
import { startCaptured, startTestSidecar, testSidecarInput, type TestSidecar } from './helpers/sidecar.js'
import { send, eventually, sleep } from './helpers/http.js'
import { startReceiver } from './helpers/receiver.js'
import { admin } from './helpers/admin.js'
import { fleetConfig, startConnectedFleet } from './helpers/fleet.js'
import { ROOT } from './helpers/root.js'
import { runCli, tempDir } from './helpers/process.js'
import { writeFileSync } from 'node:fs'
import { TEST_TOKEN } from './helpers/sidecar.js'
import { resolveConfig, ConfigError } from '../src/config/load.js'

async function status (s: TestSidecar, path = '/checkout/pay'): Promise<number> {
  return (await send(s.proxy, path)).status
}

async function allAre (fleet: TestSidecar[], expected: number): Promise<boolean> {
  return await eventually(async () => (await Promise.all(fleet.map(async (s) => await status(s)))).every((x) => x === expected), 20_000, 50)
}

async function flagOrigin (s: TestSidecar): Promise<string> {
  return (await admin(s.admin, 'GET', '/v1/state')).body.flags.newCheckout.origin as string
}

t.test('one fleet write reaches every sidecar, is visible in etcd and audited on each', async (t) => {
  const { etcd, fleet } = await startConnectedFleet(t)
  const [s0, s1, s2] = fleet
  t.equal(await status(s1), 200)

  const res = await admin(s0.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'bad release', scope: 'fleet' })
  t.equal(res.status, 200, JSON.stringify(res.body))
  t.equal(res.body.scope, 'fleet')
  t.ok(await allAre(fleet, 503), 'the kill switch is in force on all three')
  for (const s of fleet) t.equal(await flagOrigin(s), 'fleet', 'GET /v1/state says where it came from')

  const client = new Etcd3({ hosts: etcd.endpoints })
  t.teardown(() => { client.close() })
  const stored = JSON.parse(await client.get('/bw-test/shop/flags/newCheckout').string() ?? 'null')
  t.match(stored, { value: false, reason: 'bad release', instance: 's0', expiresAt: null }, 'one key in etcd, JSON with the decision')
  t.type(stored.at, 'string')

  // Every sidecar audits what it applied.
  for (const s of [s1, s2]) {
    t.ok(await eventually(async () => ((await admin(s.admin, 'GET', '/v1/audit?limit=20')).body.entries as Array<{ action: string }>).some((e) => e.action === 'fleet.flag'), 10_000), 'audited where it was applied')
  }

  // A circuit too: forced open everywhere from one write.
  const circuit = await admin(s2.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'db melting', scope: 'fleet' })
  t.equal(circuit.status, 200, JSON.stringify(circuit.body))
  t.ok(await eventually(async () => (await Promise.all(fleet.map(async (s) => await status(s, '/other')))).every((x) => x === 503), 20_000), 'every sidecar refuses the upstream')
  const state = (await admin(s0.admin, 'GET', '/v1/state')).body
  t.equal(state.circuits.app.origin, 'fleet')
  const shown = await runCli(['status', '--admin', s1.admin], { env: { BREAKWATER_ADMIN_TOKEN: TEST_TOKEN, BREAKWATER_CONFIG: undefined, NODE_OPTIONS: undefined }, timeoutMs: 60_000 })
  t.equal(shown.code, 0, shown.stderr)
  t.match(shown.stdout, /newCheckout\s+OFF\s+fleet/, 'breakwater status shows where the flag\'s value came from')
  t.match(shown.stdout, /app\s+open\s+open\s+fleet/, 'and the circuit\'s')

  t.equal((await admin(s0.admin, 'PUT', '/v1/circuits/app', { state: 'auto', reason: 'db fine', scope: 'fleet' })).status, 200)
  t.ok(await eventually(async () => (await Promise.all(fleet.map(async (s) => await status(s, '/other')))).every((x) => x === 200), 20_000), 'automatic again everywhere')

  // Restore for the fleet: back on everywhere.
  const restored = await admin(s1.admin, 'DELETE', '/v1/flags/newCheckout', { reason: 'fixed', scope: 'fleet' })
  t.equal(restored.status, 200, JSON.stringify(restored.body))
  t.ok(await allAre(fleet, 200), 'on again on all three')
  for (const s of fleet) t.equal(await flagOrigin(s), 'config')
})

t.test('the newest operator decision wins, local or fleet, both ways', async (t) => {
  const { fleet } = await startConnectedFleet(t)
  const [s0, s1, s2] = fleet

  // Local first, then fleet: the fleet decision is newer and wins on s1 as well.
  t.equal((await admin(s1.admin, 'PUT', '/v1/flags/newCheckout', { enabled: true, reason: 'canary keeps it' })).status, 200)
  t.equal((await admin(s0.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'fleet kill', scope: 'fleet' })).status, 200)
  t.ok(await allAre(fleet, 503), 'fleet kill beats the older local override')
  t.equal(await flagOrigin(s1), 'fleet')

  // Then local again on s1: newer than the fleet's, so s1 serves; the others stay killed.
  t.equal((await admin(s1.admin, 'PUT', '/v1/flags/newCheckout', { enabled: true, reason: 'this pod is fine' })).status, 200)
  t.equal(await status(s1), 200, 'the newer local decision wins on s1')
  t.equal(await flagOrigin(s1), 'local')
  t.equal(await status(s0), 503, 's0 keeps the fleet decision')

  // A trigger's kill switch never beats a fleet operator decision, even when newer.
  const kill = await admin(s0.admin, 'PUT', '/v1/flags/newCheckout', { enabled: true, reason: 'fleet on', scope: 'fleet' })
  t.equal(kill.status, 200)
  t.ok(await allAre(fleet, 200))
  await s2.sidecar.control.mitigate({ action: 'killSwitch', flags: ['newCheckout'], reason: 'trigger x', requester: 'trigger:x', source: 'trigger:x' })
  t.equal(await status(s2), 200, 'the fleet operator decision stands over the newer trigger')
  t.equal(await flagOrigin(s2), 'fleet')
})

t.test('a fleet kill that reached a sidecar before its config knew the flag is in force once a reload defines it', async (t) => {
  const { up, etcd, fleet } = await startConnectedFleet(t)
  const [s0, s1] = fleet
  // A config rollout: s0 has the new route and its flag first, s1 still runs the old config.
  const withBeta = (s: TestSidecar): Record<string, unknown> => testSidecarInput(fleetConfig(up.url, etcd.endpoints, {
    routes: [
      { name: 'beta', match: { pathPrefix: '/beta' }, upstream: 'app', killSwitch: 'newBeta' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { newCheckout: true, newBeta: true }
  }), s.stateDir)
  await s0.sidecar.apply(resolveConfig(withBeta(s0)).config)
  const kill = await admin(s0.admin, 'PUT', '/v1/flags/newBeta', { enabled: false, reason: 'beta broken', scope: 'fleet' })
  t.equal(kill.status, 200, JSON.stringify(kill.body))
  t.equal(await status(s0, '/beta'), 503, 'killed where the flag is known')
  t.ok(await eventually(() => s1.sidecar.control.state.fleet.flags.newBeta !== undefined, 10_000), 's1 has seen the fleet kill')

  // The rollout reaches s1: the route and the flag arrive, and the fleet's decision holds there too.
  await s1.sidecar.apply(resolveConfig(withBeta(s1)).config)
  t.equal(await status(s1, '/beta'), 503, 'the fleet kill is in force on s1 once its config defines the flag')
  t.equal((await admin(s1.admin, 'GET', '/v1/state')).body.flags.newBeta.origin, 'fleet')
})

t.test('breakwater kill --fleet and restore --fleet act on every sidecar through one of them', async (t) => {
  const { fleet } = await startConnectedFleet(t)
  const env = { BREAKWATER_ADMIN_TOKEN: TEST_TOKEN, BREAKWATER_CONFIG: undefined, NODE_OPTIONS: undefined }
  const kill = await runCli(['kill', 'newCheckout', '--fleet', '--reason', 'bad deploy', '--admin', fleet[1].admin], { env, timeoutMs: 60_000 })
  t.equal(kill.code, 0, kill.stderr)
  t.match(kill.stdout, /forced OFF on every sidecar of the service \(fleet\)/)
  t.ok(await allAre(fleet, 503))
  const misuse = await runCli(['lift', 'm-1', '--fleet', '--reason', 'x', '--admin', fleet[1].admin], { env, timeoutMs: 60_000 })
  t.not(misuse.code, 0)
  t.match(misuse.stderr, /--fleet applies to kill, restore, circuit/)
  const restore = await runCli(['restore', 'newCheckout', '--fleet', '--reason', 'fixed', '--admin', fleet[2].admin], { env, timeoutMs: 60_000 })
  t.equal(restore.code, 0, restore.stderr)
  t.match(restore.stdout, /fleet override dropped/)
  t.ok(await allAre(fleet, 200))
})

t.test('a local restore under a fleet kill switch says the feature is still off, why, and how to lift it', async (t) => {
  const { fleet } = await startConnectedFleet(t)
  const [s0, s1] = fleet
  const env = { BREAKWATER_ADMIN_TOKEN: TEST_TOKEN, BREAKWATER_CONFIG: undefined, NODE_OPTIONS: undefined }
  t.equal((await admin(s0.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'checkout 500s', scope: 'fleet' })).status, 200)
  t.ok(await allAre(fleet, 503))
  // An operator on s1 kills locally too, then restores locally: the fleet's kill is still the decision there.
  t.equal((await admin(s1.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'belt and braces' })).status, 200)
  const answer = await admin(s1.admin, 'DELETE', '/v1/flags/newCheckout', { reason: 'fixed' })
  t.equal(answer.status, 200, JSON.stringify(answer.body))
  t.match(answer.body, { flag: 'newCheckout', override: null, enabled: false, origin: 'fleet', fleetOverride: { value: false, reason: 'checkout 500s', instance: 's0' } }, 'the answer says what is in force, and whose decision it is')
  t.equal(await status(s1), 503, 'and it is the truth')
  const restore = await runCli(['restore', 'newCheckout', '--reason', 'fixed', '--admin', s1.admin], { env, timeoutMs: 60_000 })
  t.equal(restore.code, 0, restore.stderr)
  t.notMatch(restore.stdout, /now ON/)
  t.match(restore.stdout, /still OFF: the fleet's override \(kill switch, reason "checkout 500s"/, 'the operator is told the fleet kill is in force')
  t.match(restore.stdout, /breakwater restore newCheckout --fleet --reason/, 'and how to lift it')
  const audit = (await admin(s1.admin, 'GET', '/v1/audit?limit=5')).body.entries as Array<Record<string, unknown>>
  t.match(audit.find((e) => e.action === 'flag.clear'), { enabled: false, origin: 'fleet' }, 'audited with what stayed in force')

  // The fleet's restore is the newest decision: it lifts the fleet kill, and s1's older local one with it.
  const fleetRestore = await runCli(['restore', 'newCheckout', '--fleet', '--reason', 'fixed', '--admin', s1.admin, '--json'], { env, timeoutMs: 60_000 })
  t.equal(fleetRestore.code, 0, fleetRestore.stderr)
  t.match(JSON.parse(fleetRestore.stdout), { scope: 'fleet', enabled: true, origin: 'config' })
  t.ok(await allAre(fleet, 200), 'on again everywhere')
})

t.test('a fleet ttl lapses on every sidecar: each logs and audits the end of the same mitigation, its writer alone notifies', async (t) => {
  const hooks = await startReceiver()
  t.teardown(hooks.close)
  const { fleet } = await startConnectedFleet(t, { notifications: { webhooks: [hooks.url] } })
  const res = await admin(fleet[0].admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'for a moment', scope: 'fleet', ttl: '2s' })
  t.equal(res.status, 200)
  t.type(res.body.expiresAt, 'string')
  t.ok(await allAre(fleet, 503), 'killed everywhere')
  t.ok(await allAre(fleet, 200), 'and on again everywhere once the ttl ran out')
  for (const s of fleet) {
    t.equal(await flagOrigin(s), 'config')
    t.ok(s.logs.some((l) => l.action === 'override_expired' && l.scope === 'fleet'), 'each says it expired')
  }
  // The incident commander reads any one sidecar: each says which fleet action ended, and whose.
  const ids = new Set<unknown>()
  for (const [i, s] of fleet.entries()) {
    const lift = s.logs.find((l) => l.event === 'mitigation' && l.action === 'lift' && l.scope === 'fleet')
    t.match(lift, { mitigation: 'killSwitch', targets: ['newCheckout'], writer: 's0', reason: 'ttl expired' }, `s${i} logs the fleet kill switch lifted`)
    let audit: Record<string, unknown> | undefined
    await eventually(async () => {
      audit = ((await admin(s.admin, 'GET', '/v1/audit?limit=20')).body.entries as Array<Record<string, unknown>>).find((e) => e.action === 'flag.expire')
      return audit !== undefined
    }, 10_000)
    t.match(audit, { scope: 'fleet', targets: ['newCheckout'], writer: 's0', lifted: [lift?.id] }, `s${i} audits it with the mitigation's id`)
    ids.add(lift?.id)
  }
  t.equal(ids.size, 1, 'one mitigation id on every sidecar')
  await sleep(1500)
  t.equal(hooks.deliveries.filter((d) => d.body?.event === 'mitigation_lifted').length, 1, 'and one notification for the fleet action, from its writer')
})

t.test('a fleet override that lapsed is not applied again by a later resync: no second "lifted", no audit of it applied', async (t) => {
  const hooks = await startReceiver()
  t.teardown(hooks.close)
  const { up, fleet } = await startConnectedFleet(t, { notifications: { webhooks: [hooks.url] } })
  const [s0] = fleet
  t.equal((await admin(s0.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'for a moment', scope: 'fleet', ttl: '1s' })).status, 200)
  t.ok(await allAre(fleet, 503), 'killed everywhere')
  t.ok(await allAre(fleet, 200), 'on again everywhere')
  const lifted = (): number => hooks.deliveries.filter((d) => d.body?.event === 'mitigation_lifted').length
  t.ok(await eventually(() => lifted() === 1, 20_000), 'its writer announced the end')

  // The writer restarts (a new pod of the same name, or a rollout): it reads the prefix again,
  // where the lapsed entry still is.
  await s0.sidecar.close()
  const { config } = resolveConfig(testSidecarInput(fleetConfig(up.url, s0.sidecar.config.fleet?.etcd.endpoints as string[], { notifications: { webhooks: [hooks.url] } }), s0.stateDir))
  const again = await startCaptured(t, config, s0.stateDir, { instance: 's0' })
  t.ok(await eventually(() => again.sidecar.fleet?.connected === true, 30_000), 'connected again')
  await sleep(2500) // past a resync and the next lapse
  t.equal(await status(again), 200)
  t.equal(lifted(), 1, 'the end was announced once')
  t.notOk(again.logs.some((l) => l.event === 'fleet_override'), 'the lapsed override is not applied again')
  t.notOk(again.logs.some((l) => l.action === 'override_expired'), 'nor does it expire again')
})

t.test('scope fleet without a fleet section is a clear 400; a bad scope is a 400', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { fleet: _fleet, ...alone } = fleetConfig(up.url, [])
  const s = await startTestSidecar(t, alone)
  const res = await admin(s.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'x', scope: 'fleet' })
  t.equal(res.status, 400)
  t.equal(res.body.error, 'fleet_not_configured')
  const bad = await admin(s.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'x', scope: 'galaxy' })
  t.equal(bad.status, 400)
  t.match(bad.body.message, /scope/)
})

t.test('fleet config: validate names the key', async (t) => {
  const base = fleetConfig('http://127.0.0.1:1', ['http://127.0.0.1:2379'])
  const problems = (input: Record<string, unknown>): string[] => {
    try { resolveConfig(input); return [] } catch (err) { return err instanceof ConfigError ? [...err.problems] : [String(err)] }
  }
  t.same(problems(base), [])
  t.match(problems({ ...base, fleet: { etcd: { endpoints: [] } } }).join('\n'), /fleet\.etcd\.endpoints/)
  t.match(problems({ ...base, fleet: { etcd: { endpoints: ['http://127.0.0.1:2379'], prefix: 'nope' } } }).join('\n'), /fleet\.etcd\.prefix/)
  t.match(problems({ ...base, fleet: { etcd: { endpoints: ['http://127.0.0.1:2379'], username: 'u' } } }).join('\n'), /fleet\.etcd\.password/)
  t.match(problems({ ...base, fleet: { etcd: { endpoints: ['http://127.0.0.1:2379'] }, leaseTtl: '1s' } }).join('\n'), /fleet\.leaseTtl/)
  // The etcd client's TLS files are checked with the config, as every other TLS file.
  const dir = tempDir(t)
  const cut = join(dir, 'cut.pem')
  writeFileSync(cut, '-----BEGIN CERTIFICATE-----\nMIIB\n')
  const missing = join(dir, 'missing.pem')
  t.match(problems({ ...base, fleet: { etcd: { endpoints: ['https://127.0.0.1:2379'], tls: { ca: missing } } } }).join('\n'), `fleet.etcd.tls.ca: ${missing} does not exist`, 'a missing CA file names its key')
  t.match(problems({ ...base, fleet: { etcd: { endpoints: ['https://127.0.0.1:2379'], tls: { ca: cut } } } }).join('\n'), /^fleet\.etcd\.tls\.ca: /m, 'so does a CA file cut short')
  const { config } = resolveConfig(base)
  t.same(config.fleet, { etcd: { endpoints: ['http://127.0.0.1:2379'], prefix: '/bw-test', username: null, password: null, tls: null, tlsPem: null }, leaseTtlMs: 2000 })
})

t.test('without fleet, neither the fleet module nor the etcd client is loaded', async (t) => {
  // A child process records every module it resolves; it starts a sidecar with and without `fleet`.
  const script = `
    import { register } from 'node:module'
    import { MessageChannel } from 'node:worker_threads'
    const { port1, port2 } = new MessageChannel()
    const seen = []
    port1.on('message', (m) => { seen.push(m) })
    port1.unref()
    register('data:text/javascript,' + encodeURIComponent(\`
      let port
      export function initialize (data) { port = data.port }
      export async function resolve (specifier, context, next) { const r = await next(specifier, context); port.postMessage(r.url); return r }
    \`), { data: { port: port2 }, transferList: [port2] })
    const { resolveConfig } = await import(${JSON.stringify(pathToFileURL(join(ROOT, 'dist/config/load.js')).href)})
    const { startSidecar } = await import(${JSON.stringify(pathToFileURL(join(ROOT, 'dist/sidecar.js')).href)})
    const { mkdtempSync } = await import('node:fs')
    const { tmpdir } = await import('node:os')
    const base = { service: 'shop', stateDir: mkdtempSync(tmpdir() + '/bw-'), listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } }, upstreams: { app: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }], logging: { level: 'silent' }, shutdown: { drainDelayMs: 0, timeoutMs: 0 } }
    const plain = await startSidecar(resolveConfig(base).config, { adminToken: 'x'.repeat(32) })
    await new Promise((r) => setTimeout(r, 200))
    const before = seen.filter((u) => /etcd3|grpc|\\/fleet\\/(fleet|etcd)\\.js/.test(u))
    await plain.close()
    const withFleet = await startSidecar(resolveConfig({ ...base, stateDir: mkdtempSync(tmpdir() + '/bw-'), fleet: { etcd: { endpoints: ['http://127.0.0.1:1'] } } }).config, { adminToken: 'x'.repeat(32) })
    await new Promise((r) => setTimeout(r, 200))
    const after = seen.filter((u) => /etcd3|grpc|\\/fleet\\/(fleet|etcd)\\.js/.test(u))
    await withFleet.close()
    console.log(JSON.stringify({ before, after }))
    process.exit(0)
  `
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } })
  let out = ''
  let err = ''
  child.stdout.on('data', (c: Buffer) => { out += c.toString() })
  child.stderr.on('data', (c: Buffer) => { err += c.toString() })
  const code = await new Promise((resolve) => child.on('close', resolve))
  t.equal(code, 0, err)
  const line = out.trim().split('\n').at(-1) ?? '{}'
  const { before, after } = JSON.parse(line) as { before: string[], after: string[] }
  t.same(before, [], 'a sidecar without fleet resolved no etcd or gRPC module')
  t.ok(after.some((u) => u.includes('/fleet/etcd.js')), 'with fleet the etcd client is loaded (the check can see it)')
  t.ok(after.some((u) => u.includes('/fleet/fleet.js')))
  t.same(after.filter((u) => /etcd3|grpc/.test(u)), [], 'and no gRPC: the client speaks etcd\'s JSON gateway over undici')
})
