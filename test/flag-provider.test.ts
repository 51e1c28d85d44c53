import t, { type Test } from 'tap'
import { writeFileSync, renameSync } from 'node:fs'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { ROOT } from './helpers/root.js'
import { FlagdCore } from '@openfeature/flagd-core'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar, startCaptured, testSidecarInput, type TestSidecar } from './helpers/sidecar.js'
import { resolveConfig } from '../src/config/load.js'
import { send, eventually, sleep } from './helpers/http.js'
import { flagDir, flagdText, writeFlagFile, checkoutRoutes } from './helpers/flags.js'
import { admin } from './helpers/admin.js'

// The real @openfeature/flagd-provider, in-process with a flag file (flagd's offline mode). It
// watches the file with fs.watchFile (Node's ~5 s stat interval), so changes take seconds.
const CHANGE_DEADLINE_MS = 30_000

function flagdProvider (path: string): Record<string, unknown> {
  return { module: '@openfeature/flagd-provider', export: 'FlagdProvider', options: { resolverType: 'in-process', offlineFlagSourcePath: path } }
}


async function metric (ops: string, pattern: RegExp): Promise<number> {
  const text = await (await fetch(`${ops}/metrics`)).text()
  const m = pattern.exec(text)
  return m === null ? NaN : Number(m[1])
}

t.test('flagd provider: its flags fill the snapshot at READY, and a changed flag file applies on its CONFIGURATION_CHANGED event', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  writeFlagFile(path, { enableNewCheckout: { defaultVariant: 'off' } })
  const { proxy, sidecar, logs } = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true }, flagProvider: flagdProvider(path) }))
  t.equal((await send(proxy, '/checkout')).status, 503, 'the provider says off: it wins over featureFlags from the first request')
  t.equal(sidecar.flags.sources.resolve('enableNewCheckout')?.origin, 'provider')
  t.equal(up.received.length, 0)

  writeFlagFile(path, { enableNewCheckout: { defaultVariant: 'on' } })
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 200, CHANGE_DEADLINE_MS, 100), 'the provider announced the change and the kill switch lifted')
  writeFlagFile(path, { enableNewCheckout: { defaultVariant: 'off' } })
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 503, CHANGE_DEADLINE_MS, 100), 'and applied again')
  t.ok(logs.some((l) => l.event === 'flag_changed' && l.flag === 'enableNewCheckout' && l.origin === 'provider'), 'the change is logged with its origin')
  t.equal((await send(proxy, '/other')).status, 200)
})

t.test('flagd provider: a targeted flag blocks exactly the requests flagd says are off, evaluated synchronously on the provider\'s own definitions', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  const flags = {
    enableNewCheckout: {
      targeting: {
        if: [{ in: [{ var: 'targetingKey' }, ['blocked-1', 'blocked-2']] }, 'off',
          { starts_with: [{ var: 'path' }, '/checkout/v2'] }, 'off',
          { fractional: [['on', 70], ['off', 30]] }]
      }
    }
  }
  writeFlagFile(path, flags)
  const core = new FlagdCore()
  core.setConfigurations(flagdText(flags))
  const { proxy, sidecar } = await startTestSidecar(t, checkoutRoutes(up.url, {
    featureFlags: { enableNewCheckout: true },
    flagProvider: flagdProvider(path),
    flags: { targetingKeyHeader: 'x-user' }
  }))
  t.ok(sidecar.flags.targeted?.has('enableNewCheckout'), 'the provider reports targeting: evaluated per request')
  let allowed = 0
  let blocked = 0
  for (const user of ['blocked-1', 'blocked-2', ...Array.from({ length: 30 }, (_, i) => `user-${i}`)]) {
    for (const p of ['/checkout/v1', '/checkout/v2/pay']) {
      const want = core.resolveBooleanEvaluation('enableNewCheckout', true, { targetingKey: user, path: p, method: 'GET', host: '' }).value
      const r = await send(proxy, p, { headers: { 'x-user': user } })
      t.equal(r.status, want ? 200 : 503, `${user} ${p}: flagd says ${want ? 'on' : 'off'}`)
      if (want) allowed++
      else blocked++
    }
  }
  t.ok(allowed > 0 && blocked > 34, `some on, the named users, /checkout/v2 and the fractional 30 % off (${allowed} on, ${blocked} off)`)
  t.equal(up.received.length, allowed, 'the upstream saw exactly the requests flagd let through')
})

t.test('flagd provider: a flag file missing at start is a warning and a count; the sidecar serves on featureFlags and picks the provider up once the file appears', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  const { proxy, ops, logs } = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true }, flagProvider: flagdProvider(path) }))
  t.equal((await send(proxy, '/checkout')).status, 200, 'serving on featureFlags')
  t.ok(await eventually(() => logs.some((l) => l.event === 'flag_source' && l.level === 'warn' && /flag provider error/.test(String(l.msg))), 5000), 'a warn log for the provider error')
  t.ok(await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/) >= 1, 'counted under source="provider"')
  t.equal(await metric(ops, /breakwater_flag_source_errors_total\{source="file"\} (\d+)/), 0)

  writeFlagFile(path, { enableNewCheckout: { defaultVariant: 'off' } })
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 503, CHANGE_DEADLINE_MS, 100), 'the provider initialised on a retry and its flags apply')
})

/**
 * A provider without events, in a module of its own (the default export): it reads a JSON
 * file of `key → true | false | "targeted"` at every evaluation.
 */
const POLLED_PROVIDER = `
import { readFileSync } from 'node:fs'
export default class FileBackedProvider {
  constructor (options) { this.path = options.path; this.metadata = { name: 'file-backed' }; this.runsOn = 'server' }
  async resolveBooleanEvaluation (key, defaultValue) {
    const flags = JSON.parse(readFileSync(this.path, 'utf8'))
    if (!(key in flags)) return { value: defaultValue, reason: 'ERROR', errorCode: 'FLAG_NOT_FOUND' }
    if (flags[key] === 'targeted') return { value: true, reason: 'TARGETING_MATCH', variant: 'on' }
    return { value: flags[key], reason: 'STATIC', variant: String(flags[key]) }
  }
  async resolveStringEvaluation (key, defaultValue) { return { value: defaultValue, reason: 'ERROR', errorCode: 'TYPE_MISMATCH' } }
  async resolveNumberEvaluation (key, defaultValue) { return { value: defaultValue, reason: 'ERROR', errorCode: 'TYPE_MISMATCH' } }
  async resolveObjectEvaluation (key, defaultValue) { return { value: defaultValue, reason: 'ERROR', errorCode: 'TYPE_MISMATCH' } }
}
`

/**
 * A sidecar whose flags come from POLLED_PROVIDER reading a values file (enableNewCheckout on at
 * first); `setValues` replaces the file whole. `pollMs` is left out when undefined.
 */
async function startPolled (t: Test, featureFlags: Record<string, boolean>, pollMs?: number): Promise<{ running: TestSidecar, setValues: (v: Record<string, unknown>) => void }> {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = flagDir(t)
  writeFileSync(join(dir, 'provider.mjs'), POLLED_PROVIDER)
  const values = join(dir, 'values.json')
  const setValues = (v: Record<string, unknown>): void => { writeFileSync(`${values}.tmp`, JSON.stringify(v)); renameSync(`${values}.tmp`, values) }
  setValues({ enableNewCheckout: true })
  // A module path resolves against the config file's folder, as a config written there would.
  const { config } = resolveConfig(testSidecarInput(
    checkoutRoutes(up.url, { featureFlags, flagProvider: { module: './provider.mjs', options: { path: values }, ...(pollMs === undefined ? {} : { pollMs }) } }),
    join(dir, 'state')
  ), { source: join(dir, 'breakwater.yaml') })
  return { running: await startCaptured(t, config, join(dir, 'state')), setValues }
}

t.test('a provider without events and without pollMs is read every 500 ms: a change applies within 1 s (SPEC §14)', async (t) => {
  const { running: { proxy, sidecar }, setValues } = await startPolled(t, { enableNewCheckout: true })
  const timer = (sidecar.flags as unknown as { flagService: { pollTimer: { _idleTimeout: number } | null } }).flagService.pollTimer
  t.equal(timer?._idleTimeout, 500, 'read every 500 ms')
  setValues({ enableNewCheckout: false })
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 503, 10_000), 'the change is picked up')
})

t.test('a provider without events is read every pollMs; one that targets without a synchronous evaluator is warned about and counted', async (t) => {
  const { running: { proxy, ops, logs }, setValues } = await startPolled(t, { enableNewCheckout: true, other: true }, 100)
  t.equal((await send(proxy, '/checkout')).status, 200)
  setValues({ enableNewCheckout: false })
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 503, 10_000), 'the poll picked the change up')

  const before = await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/)
  setValues({ enableNewCheckout: 'targeted' })
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 200, 10_000), 'its value for a request without context is served')
  t.ok(logs.some((l) => l.event === 'flag_source' && l.level === 'warn' && l.flag === 'enableNewCheckout' && /no synchronous evaluation/.test(String(l.msg))), 'warned: the provider targets but cannot be evaluated per request')
  t.equal(await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/), before + 1, 'counted once, not at every poll')
})

t.test('a reload can add, change or drop the provider; dropping it falls back to the flag file', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = flagDir(t)
  const file = join(dir, 'file.json')
  const served = join(dir, 'served.json')
  writeFlagFile(file, { enableNewCheckout: { defaultVariant: 'off' } })
  writeFlagFile(served, { enableNewCheckout: { targeting: { if: [{ starts_with: [{ var: 'path' }, '/checkout/v2'] }, 'off', 'on'] } } })
  const base = checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true }, flagSource: { type: 'flagd-file', path: file } })
  const { proxy, sidecar, stateDir } = await startTestSidecar(t, base)
  t.equal((await send(proxy, '/checkout/v1')).status, 503, 'the file says off')

  // A reload does not wait for a provider to start (operators never wait): it applies once ready.
  await sidecar.apply(resolveConfig(testSidecarInput({ ...base, flagProvider: flagdProvider(served) }, stateDir)).config)
  t.ok(await eventually(async () => (await send(proxy, '/checkout/v1')).status === 200, 10_000), 'the provider, above the file, says on here')
  t.equal((await send(proxy, '/checkout/v2')).status, 503, 'and off here')

  await sidecar.apply(resolveConfig(testSidecarInput(base, stateDir)).config)
  t.equal((await send(proxy, '/checkout/v1')).status, 503, 'without the provider the file decides again')
  t.equal(sidecar.flags.targeted, null)
})

interface EventedProvider { flags: Record<string, boolean>, set: (flags: Record<string, boolean>) => void, emit: (event: string, details?: Record<string, unknown>) => void }

t.test('provider events: CONFIGURATION_CHANGED applies at once; STALE and ERROR keep the last flags, warn once per change of state and count every time', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const fixture = join(ROOT, 'test/fixtures/evented-provider.mjs')
  const { instances } = await import(pathToFileURL(fixture).href) as { instances: EventedProvider[] }
  const { proxy, ops, logs } = await startTestSidecar(t, checkoutRoutes(up.url, {
    featureFlags: { enableNewCheckout: true },
    flagProvider: { module: fixture, export: 'EventedProvider', options: { flags: { enableNewCheckout: true } } }
  }))
  const provider = instances[instances.length - 1] as EventedProvider
  const status = async (): Promise<number> => (await send(proxy, '/checkout')).status
  const errors = async (): Promise<number> => await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/)
  const warned = (): number => logs.filter((l) => l.level === 'warn' && /^flag provider (stale|error)/.test(String(l.msg))).length
  t.equal(await status(), 200)

  provider.set({ enableNewCheckout: false })
  t.ok(await eventually(async () => await status() === 503, 5000), 'the event triggered a read (no pollMs is set)')

  const before = await errors()
  provider.emit('Stale', { message: 'sync stream lost' })
  t.ok(await eventually(() => warned() === 1, 5000), 'a warn log for the stale provider')
  t.equal(await errors(), before + 1, 'counted')
  provider.emit('Error', { message: 'still down' })
  t.ok(await eventually(async () => await errors() === before + 2, 5000), 'the error is counted too')
  t.equal(warned(), 1, 'but not logged again: the provider was already failing')
  provider.flags = { enableNewCheckout: true }
  t.equal(await status(), 503, 'the last flags stay while it is in error')

  provider.emit('Ready')
  t.ok(await eventually(async () => await status() === 200, 5000), 'READY re-reads its flags')
  t.ok(logs.some((l) => l.event === 'flag_source' && l.msg === 'flag provider ready again'))
})

interface FaultyProvider { flags: Record<string, boolean>, mode: 'ok' | 'hang' | 'throw' | 'string', hung: number, closed: boolean }

async function startFaulty (t: Test, flags: Record<string, boolean>, exported = 'FaultyProvider'): Promise<TestSidecar & { provider: FaultyProvider, status: () => Promise<number> }> {
  const up = await startUpstream()
  t.teardown(up.close)
  const fixture = join(ROOT, 'test/fixtures/faulty-provider.mjs')
  const { instances } = await import(pathToFileURL(fixture).href) as { instances: FaultyProvider[] }
  const started = await startTestSidecar(t, checkoutRoutes(up.url, {
    featureFlags: { enableNewCheckout: true },
    flagProvider: { module: fixture, export: exported, options: { flags }, pollMs: 100 }
  }))
  const provider = instances[instances.length - 1] as FaultyProvider
  return { ...started, provider, status: async () => (await send(started.proxy, '/checkout')).status }
}

interface StaleableProvider extends FaultyProvider { evaluated: number, lose: (answer: string) => void, regain: () => void }

t.test('a provider that lost its flag service (STALE) and answers FLAG_NOT_FOUND or GENERAL, as flagd\'s RPC provider does when flagd is down: its kill switch keeps its last value, not featureFlags or the code default', async (t) => {
  const started = await startFaulty(t, { enableNewCheckout: false }, 'StaleableProvider')
  const { status, ops, logs } = started
  const provider = started.provider as StaleableProvider
  t.equal(await status(), 503, 'the provider kills the feature')
  const changes = (): number => logs.filter((l) => l.event === 'flag_changed').length
  const before = changes()
  for (const answer of ['FLAG_NOT_FOUND', 'GENERAL']) {
    const errors = await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/)
    provider.lose(answer)
    const seen = provider.evaluated
    t.ok(await eventually(() => provider.evaluated >= seen + 3, 10_000), `${answer}: read again while its service is lost`)
    t.equal(await status(), 503, `${answer}: still killed, the last value the provider gave`)
    t.ok(logs.some((l) => l.event === 'flag_source' && l.flag === 'enableNewCheckout' && /lost its flag service/.test(String(l.msg))), `${answer}: said`)
    t.ok(await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/) > errors, `${answer}: counted`)
    provider.regain()
    const back = provider.evaluated
    t.ok(await eventually(() => provider.evaluated >= back + 3, 10_000), `${answer}: read again once it is back`)
    t.equal(await status(), 503, `${answer}: killed, as the provider says`)
  }
  t.equal(changes(), before, 'the flag never changed')
  provider.flags = { enableNewCheckout: true }
  t.ok(await eventually(async () => await status() === 200, 10_000), 'and its own change still applies')
})

t.test('a provider whose evaluation never settles holds no later read: the last flags stay, and once it answers its kill switch applies', async (t) => {
  const { provider, status, sidecar, ops, logs } = await startFaulty(t, { enableNewCheckout: true })
  t.equal(await status(), 200)
  const before = await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/)

  provider.mode = 'hang'
  t.ok(await eventually(() => provider.hung > 0, 10_000), 'a read is stuck in the provider')
  t.equal(await status(), 200, 'the last flags stay meanwhile')
  t.ok(await eventually(() => logs.some((l) => l.event === 'flag_source' && l.level === 'warn' && /did not answer in time/.test(String(l.msg))), 10_000), 'said')
  t.ok(await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/) > before, 'and counted')
  const reloaded = await Promise.race([sidecar.apply(sidecar.config).then(() => true), sleep(10_000).then(() => false)])
  t.ok(reloaded, 'a reload is not held by the stuck provider')

  provider.flags = { enableNewCheckout: false }
  provider.mode = 'ok'
  t.ok(await eventually(async () => await status() === 503, 10_000), 'the provider\'s kill applies once it answers again')
  t.ok(await eventually(() => logs.some((l) => l.event === 'flag_source' && l.msg === 'flag provider answers again'), 10_000))
})

t.test('a reload to a new flag provider that is not ready answers at once; the running provider keeps its kill switch until the new one has read', async (t) => {
  const { status, sidecar, logs } = await startFaulty(t, { enableNewCheckout: false })
  t.equal(await status(), 503, 'the running provider kills the feature')
  const fixture = await import(pathToFileURL(join(ROOT, 'test/fixtures/faulty-provider.mjs')).href) as { FaultyProvider: { held: Promise<void> | null }, instances: FaultyProvider[] }
  let release = (): void => {}
  fixture.FaultyProvider.held = new Promise<void>((resolve) => { release = resolve })
  t.teardown(() => { release(); fixture.FaultyProvider.held = null })

  // The new provider's flag service does not answer yet (a flagd starting, a vendor slow to connect).
  const next = { ...sidecar.config, flagProvider: { ...(sidecar.config.flagProvider as NonNullable<typeof sidecar.config.flagProvider>), options: { flags: { enableNewCheckout: true } } } }
  await sidecar.apply(next)
  t.notOk(logs.some((l) => l.event === 'flag_source' && /not ready yet/.test(String(l.msg))), 'the reload did not wait for the new provider to be ready')
  t.equal(await status(), 503, 'the running provider\'s kill switch is still in force meanwhile')
  await sleep(300) // several polls of the running provider
  t.equal(await status(), 503, 'and stays so while the new one is not ready')

  release()
  t.ok(await eventually(async () => await status() === 200, 10_000), 'once the new provider has read its flags, they are the flags')
  t.ok(logs.some((l) => l.event === 'flag_source' && /replaced/.test(String(l.msg))), 'the swap is logged')
})

t.test('a reload back to the running provider while a new one warms keeps the running one and closes the warming one: no second instance', async (t) => {
  const { status, sidecar, provider, logs } = await startFaulty(t, { enableNewCheckout: false })
  t.equal(await status(), 503, 'the running provider kills the feature')
  const fixture = await import(pathToFileURL(join(ROOT, 'test/fixtures/faulty-provider.mjs')).href) as { FaultyProvider: { held: Promise<void> | null }, instances: FaultyProvider[] }
  let release = (): void => {}
  fixture.FaultyProvider.held = new Promise<void>((resolve) => { release = resolve })
  t.teardown(() => { release(); fixture.FaultyProvider.held = null })
  const original = sidecar.config
  const before = fixture.instances.length

  await sidecar.apply({ ...original, flagProvider: { ...(original.flagProvider as NonNullable<typeof original.flagProvider>), options: { flags: { enableNewCheckout: true } } } })
  const warming = fixture.instances[fixture.instances.length - 1] as FaultyProvider
  t.equal(fixture.instances.length, before + 1, 'the new provider warms beside the running one')
  await sidecar.apply(original)
  t.equal(fixture.instances.length, before + 1, 'going back constructs no second copy of the running provider')
  t.ok(await eventually(() => warming.closed, 5000), 'the warming provider is closed')
  release()
  await sleep(300) // several polls: a stray copy would have read and taken over by now
  t.equal(fixture.instances.length, before + 1)
  t.notOk(provider.closed, 'the running provider was never closed')
  t.equal(await status(), 503, 'and its kill switch is still in force')
  t.notOk(logs.some((l) => l.event === 'flag_source' && /replaced/.test(String(l.msg))), 'no swap happened')
})

t.test('a provider that throws keeps the kill switch it holds: its last value stays until it answers again', async (t) => {
  const { provider, status, ops, logs } = await startFaulty(t, { enableNewCheckout: false })
  t.equal(await status(), 503, 'the provider kills the feature')
  const before = await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/)

  provider.mode = 'throw'
  t.ok(await eventually(() => logs.some((l) => l.event === 'flag_source' && l.level === 'warn' && /failed evaluating this flag/.test(String(l.msg))), 10_000), 'said')
  t.ok(await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/) > before, 'and counted')
  await sleep(500) // several reads (every 100 ms) while it throws
  t.equal(await status(), 503, 'still killed: the code default (on) does not replace what the provider said')
  t.notOk(logs.some((l) => l.event === 'flag_changed'), 'the flag never changed')

  provider.flags = { enableNewCheckout: true }
  provider.mode = 'ok'
  t.ok(await eventually(async () => await status() === 200, 10_000), 'restored by the provider once it answers')
})

t.test('a provider that returns a value of the wrong type for a flag is not a boolean source: ignored, warned about and counted', async (t) => {
  const { provider, status, admin: adminUrl, ops, logs } = await startFaulty(t, { enableNewCheckout: false })
  t.equal(await status(), 503)
  const before = await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/)

  provider.mode = 'string' // "false", a string, with reason STATIC
  t.ok(await eventually(() => logs.some((l) => l.event === 'flag_source' && l.flag === 'enableNewCheckout' && /not a boolean/.test(String(l.msg))), 10_000), 'warned')
  t.ok(await metric(ops, /breakwater_flag_source_errors_total\{source="provider"\} (\d+)/) > before, 'counted')
  const state = await admin(adminUrl, 'GET', '/v1/state')
  t.same(state.body.flags.enableNewCheckout.enabled, true, 'the next source decides (featureFlags: on), as for a TYPE_MISMATCH')
  t.equal(state.body.flags.enableNewCheckout.origin, 'config')
  t.notOk(logs.some((l) => l.event === 'flag_changed' && typeof l.enabled !== 'boolean'), 'no flag ever held a string')
})

t.test('an operator\'s override of a flag only the provider defines survives a restart while the provider is down, and can be set meanwhile', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const fixture = join(ROOT, 'test/fixtures/faulty-provider.mjs')
  const { FaultyProvider } = await import(pathToFileURL(fixture).href) as { FaultyProvider: { down: boolean } }
  t.teardown(() => { FaultyProvider.down = false })
  const dir = flagDir(t)
  const input = {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'providerOnly' },
      { name: 'other', match: { pathPrefix: '/other' }, upstream: 'app', killSwitch: 'alsoProviderOnly' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    flagProvider: { module: fixture, export: 'FaultyProvider', options: { flags: { providerOnly: true, alsoProviderOnly: true } }, pollMs: 100 }
  }
  const { config } = resolveConfig(testSidecarInput(input, join(dir, 'state')))
  const first = await startCaptured(t, config, join(dir, 'first'))
  t.equal((await admin(first.admin, 'PUT', '/v1/flags/providerOnly', { enabled: false, reason: 'bad feature' })).status, 200)
  t.equal((await send(first.proxy, '/checkout')).status, 503, 'killed by the operator')
  await first.sidecar.close()

  FaultyProvider.down = true
  const second = await startCaptured(t, config, join(dir, 'second'))
  t.equal((await send(second.proxy, '/checkout')).status, 503, 'still killed after the restart, the flag service down')
  t.ok(second.logs.some((l) => l.event === 'override_active' && l.flag === 'providerOnly'), 'the override in force is logged at start')
  const put = await admin(second.admin, 'PUT', '/v1/flags/alsoProviderOnly', { enabled: false, reason: 'kill it during the outage' })
  t.equal(put.status, 200, 'a flag the config uses can be overridden while the provider is down')
  t.equal((await send(second.proxy, '/other')).status, 503)
  t.equal((await admin(second.admin, 'PUT', '/v1/flags/neverHeardOf', { enabled: false, reason: 'typo' })).status, 404, 'a key nothing uses is still unknown')
})
