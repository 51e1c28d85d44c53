import t, { type Test } from 'tap'
import { mkdtempSync, writeFileSync, symlinkSync, renameSync, mkdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { OpenFeature } from '@openfeature/server-sdk'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar, testSidecarInput } from './helpers/sidecar.js'
import { send, raw, getJson, eventually, sleep } from './helpers/http.js'
import { resolveConfig, ConfigError } from '../src/config/load.js'
import { checkoutRoutes, flagDir, writeFlagFile } from './helpers/flags.js'
import { admin } from './helpers/admin.js'
import { FlagFileWatcher } from '../src/flags/flagd-file.js'
import { connect } from 'node:net'
import { once } from 'node:events'

function flagFile (flags: Record<string, { state?: string, on?: boolean, defaultVariant?: string | null }>): string {
  return JSON.stringify({
    $schema: 'https://flagd.dev/schema/v0/flags.json',
    flags: Object.fromEntries(Object.entries(flags).map(([key, f]) => [key, {
      state: f.state ?? 'ENABLED',
      variants: { on: true, off: false },
      defaultVariant: f.defaultVariant !== undefined ? f.defaultVariant : (f.on === false ? 'off' : 'on')
    }]))
  })
}

function tmp (t: { teardown: (fn: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-flags-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}


t.test('a route whose flag is off is refused without touching its upstream; other routes are untouched', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { proxy, proxyPort, ops } = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: false } }))
  const refused = await send(proxy, '/checkout/pay')
  t.equal(refused.status, 503)
  t.equal(refused.json().error, 'feature_disabled')
  t.equal(refused.headers['x-breakwater-mitigation'], 'kill-switch')
  t.equal(refused.headers['x-breakwater-error'], 'feature_disabled')
  t.equal(up.received.length, 0, 'the upstream saw nothing')
  t.equal((await send(proxy, '/other')).status, 200)
  t.equal((await send(proxy, '/checkou%74/pay')).status, 503, 'a kill switch cannot be bypassed by spelling')
  t.equal((await send(proxy, '//x/../checkout')).status, 503)
  const absolute = await raw(proxyPort, 'GET http://shop/checkout/pay HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n')
  t.match(absolute, /^HTTP\/1\.1 503 [^]*x-breakwater-error: feature_disabled/, '... nor by an absolute-form target')
  t.same(up.received.map((r) => r.url), ['/other'], 'the upstream saw only the other route\'s request')
  const metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_flag_enabled\{flag="enableNewCheckout"\} 0/)
  t.match(metrics, /breakwater_rejections_total\{route="checkout",reason="kill_switch"\} 4/)
})

t.test('breakwater_flag_killed tells a kill from a flag its source has off (what the kill-switch alert fires on)', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true, notLaunched: false } }))
  const killed = async (flag: string): Promise<string | undefined> => new RegExp(`breakwater_flag_killed\\{flag="${flag}"\\} (\\d)`).exec(await (await fetch(`${s.ops}/metrics`)).text())?.[1]
  t.equal(await killed('notLaunched'), '0', 'off in the config: not a kill')
  t.equal(await killed('enableNewCheckout'), '0', 'on: not a kill')
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'errors on checkout' })).status, 200)
  t.equal(await killed('enableNewCheckout'), '1', 'killed by an operator')
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/notLaunched', { enabled: true, reason: 'launch' })).status, 200)
  t.equal(await killed('notLaunched'), '0', 'forced on: not a kill')
  t.equal((await admin(s.admin, 'DELETE', '/v1/flags/enableNewCheckout', { reason: 'fixed' })).status, 200)
  t.equal(await killed('enableNewCheckout'), '0', 'restored')
})

t.test('a killSwitch naming a flag no source defines is a config error', async (t) => {
  let problems: readonly string[] = []
  try {
    resolveConfig({ service: 's', upstreams: { a: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'a', killSwitch: 'nope' }], featureFlags: { other: true } })
  } catch (err) {
    t.type(err, ConfigError)
    problems = (err as ConfigError).problems
  }
  t.same(problems, ['routes[0].killSwitch: flag "nope" is not defined in featureFlags'])
})

t.test('a route path written in another spelling than requests are matched in still guards its paths', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const routes = [
    { name: 'home', match: { pathPrefix: '/%7Euser' }, upstream: 'app', killSwitch: 'homes' },
    { name: 'pair', match: { path: '/a//b' }, upstream: 'app', killSwitch: 'homes' },
    { name: 'dots', match: { pathPrefix: '/x/./y/' }, upstream: 'app', killSwitch: 'homes' },
    { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
  ]
  const input = { upstreams: { app: { url: up.url } }, routes, featureFlags: { homes: false } }
  const { warnings } = resolveConfig(testSidecarInput(input, '/tmp'))
  t.same(warnings.filter((w) => w.includes('normalised')), [
    'routes[0].match.pathPrefix: "/%7Euser" is matched as "/~user": request paths are normalised before matching',
    'routes[1].match.path: "/a//b" is matched as "/a/b": request paths are normalised before matching',
    'routes[2].match.pathPrefix: "/x/./y/" is matched as "/x/y/": request paths are normalised before matching'
  ], 'validate says how each is read')
  const { proxy } = await startTestSidecar(t, input)
  for (const path of ['/~user', '/%7Euser/photos', '/%7euser', '/a/b', '/a//b', '/x/y/z', '/x/./y/z']) {
    t.equal((await send(proxy, path)).status, 503, `${path} is killed`)
  }
  t.equal(up.received.length, 0, 'the killed feature saw nothing')
  t.equal((await send(proxy, '/other')).status, 200)

  // Paths no request can have are config errors, not routes that silently guard nothing.
  let problems: readonly string[] = []
  try {
    resolveConfig({ service: 's', upstreams: { a: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/p;v=1' }, upstream: 'a' }, { match: { path: '/q%zz' }, upstream: 'a' }, { match: { path: '/r;v=1', strict: true }, upstream: 'a' }] })
  } catch (err) {
    t.type(err, ConfigError)
    problems = (err as ConfigError).problems
  }
  t.same(problems, [
    'routes[0].match.pathPrefix: "/p;v=1" never matches: matching ignores ";" parameters and the query (set match.strict to compare them)',
    'routes[1].match.path: "/q%zz" is not a path a request can have (an invalid %-escape, "#" or "\\")'
  ])
})

t.test('flags are served through a real OpenFeature provider', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { sidecar } = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: false, beta: true } }))
  const domain = (sidecar.flags as unknown as { domain: string }).domain
  const client = OpenFeature.getClient(domain)
  t.equal(await client.getBooleanValue('enableNewCheckout', true), false)
  t.equal(await client.getBooleanValue('beta', false), true)
  const missing = await client.getBooleanDetails('missing', true)
  t.equal(missing.errorCode, 'FLAG_NOT_FOUND')
  t.same([...sidecar.flags.values], [['enableNewCheckout', false], ['beta', true]], 'the request path reads this snapshot')
})

t.test('flag file: precedence over featureFlags, an in-place rewrite applies, broken file keeps the last good flags', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = tmp(t)
  const path = join(dir, 'flags.json')
  writeFileSync(path, flagFile({ enableNewCheckout: { on: false } }))
  const { proxy, ops, logs } = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true }, flagSource: { type: 'flagd-file', path } }))
  t.equal((await send(proxy, '/checkout')).status, 503, 'the file wins over featureFlags')

  writeFileSync(path, flagFile({ enableNewCheckout: { on: true } }))
  const started = Date.now()
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 200, 15_000), 'the rewrite applied')
  t.comment(`applied after ${Date.now() - started} ms`)

  writeFileSync(path, '{ not json')
  t.ok(await eventually(() => logs.some((l) => l.event === 'flag_source' && l.level === 'error'), 2000), 'an error is logged')
  t.equal((await send(proxy, '/checkout')).status, 200, 'the last good flags stay')
  writeFileSync(path, JSON.stringify({ flags: { enableNewCheckout: { state: 'ENABLED' } } }))
  await sleep(600)
  t.equal((await send(proxy, '/checkout')).status, 200, 'a wrong shape is ignored too')
  const metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_flag_source_errors_total\{source="file"\} 2/)

  // A kill switch whose variants are strings would never switch off: the file is refused.
  writeFileSync(path, flagFile({ enableNewCheckout: { on: false } }))
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 503, 15_000), 'killed by the file')
  writeFileSync(path, JSON.stringify({ flags: { enableNewCheckout: { state: 'ENABLED', variants: { on: 'true', off: 'false' }, defaultVariant: 'on' } } }))
  t.ok(await eventually(() => logs.some((l) => l.event === 'flag_source' && l.level === 'error' && /enableNewCheckout\.variants: must be true and false/.test(String(l.error))), 2000), 'the string variants are named in an error line')
  t.equal((await send(proxy, '/checkout')).status, 503, 'the last good flags stay: still killed')
  t.match(await (await fetch(`${ops}/metrics`)).text(), /breakwater_flag_source_errors_total\{source="file"\} 3/, 'and counted')

  writeFileSync(path, flagFile({ somethingElse: { on: false } }))
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 200, 15_000), 'a key dropped from the file falls back to featureFlags (true)')
})

/** A watcher of `path` polling every `intervalMs` that records what it reads (`enableNewCheckout`) and its errors; stopped at teardown. */
function recordingWatcher (t: Test, path: string, intervalMs: number): { watcher: FlagFileWatcher, read: Array<boolean | undefined>, errors: string[] } {
  const read: Array<boolean | undefined> = []
  const errors: string[] = []
  const watcher = new FlagFileWatcher(path, intervalMs, {
    onFlags: (flags) => { read.push(flags?.values.get('enableNewCheckout')) },
    onError: (error) => { errors.push(error) },
    onPresence: () => {}
  })
  t.teardown(() => { watcher.stop() })
  return { watcher, read, errors }
}

t.test('flag file rewritten in place: a poll that catches it half written waits for the next, with no error', async (t) => {
  const dir = tmp(t)
  const path = join(dir, 'flags.json')
  writeFileSync(path, flagFile({ enableNewCheckout: { on: true } }))
  // The polls, driven by hand: no timer decides when this test looks.
  const { watcher, read, errors } = recordingWatcher(t, path, 3_600_000)
  await watcher.start()
  t.same(read, [true], 'read at start')
  const poll = async (): Promise<void> => { await (watcher as unknown as { poll: () => Promise<void> }).poll() }

  // An editor or `cat > flags.json` in more than one write: truncated, then half, then the rest.
  const next = flagFile({ enableNewCheckout: { on: false } })
  writeFileSync(path, '')
  await poll()
  writeFileSync(path, next.slice(0, 40))
  await poll()
  writeFileSync(path, next)
  await poll()
  t.same(errors, [], 'neither the empty file nor half of it is an error')
  t.same(read, [true], 'nor read while it changes')
  await poll()
  t.same(read, [true, false], 'the whole file is read once two polls see it the same')
  await poll()
  t.same(read, [true, false], 'and only once')

  writeFileSync(path, '{ not json')
  await poll()
  t.same(errors, [], 'a broken file is not judged at the poll that first sees it')
  await poll()
  t.equal(errors.length, 1, 'left broken, it is an error')
  await poll()
  t.equal(errors.length, 1, 'once')
  t.same(read, [true, false], 'and the last good flags stay')
})

t.test('flag file half written at start: the start waits for the whole file instead of starting without its kill switches', async (t) => {
  const dir = tmp(t)
  const path = join(dir, 'flags.json')
  const whole = flagFile({ enableNewCheckout: { on: false } })
  // Validation read the file whole; then a writer rewrote it in place and is half way through.
  writeFileSync(path, whole.slice(0, 40))
  const { watcher, read, errors } = recordingWatcher(t, path, 50)
  // The first read is made before start() returns: it sees half the file. The writer finishes.
  const started = watcher.start()
  writeFileSync(path, whole)
  await started
  t.same(errors, [], 'half a file at start is not an error while it is being written')
  t.same(read, [false], 'the file\'s kill switch is in force from the start')
})

t.test('flag file broken at start and left so: the start gives up on it with one error, and picks it up once fixed', async (t) => {
  const dir = tmp(t)
  const path = join(dir, 'flags.json')
  writeFileSync(path, '{ not json')
  const { watcher, read, errors } = recordingWatcher(t, path, 50)
  await watcher.start()
  t.equal(errors.length, 1, 'one error once the wait is over')
  t.same(read, [], 'nothing read')
  writeFileSync(path, flagFile({ enableNewCheckout: { on: false } }))
  t.ok(await eventually(() => read.length === 1, 10_000), 'the fixed file is read by the polls')
  t.same(read, [false])
  t.equal(errors.length, 1, 'and no further error')
})

t.test('flag file: the Kubernetes ConfigMap symlink swap is picked up', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = tmp(t)
  // The kubelet's layout: flags.json -> ..data/flags.json, ..data -> ..<timestamp>/
  const v1 = join(dir, '..2026_11_27_v1')
  mkdirSync(v1)
  writeFileSync(join(v1, 'flags.json'), flagFile({ enableNewCheckout: { on: true } }))
  symlinkSync('..2026_11_27_v1', join(dir, '..data'))
  symlinkSync('..data/flags.json', join(dir, 'flags.json'))
  const { proxy } = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true }, flagSource: { type: 'flagd-file', path: join(dir, 'flags.json') } }))
  t.equal((await send(proxy, '/checkout')).status, 200)

  const v2 = join(dir, '..2026_11_27_v2')
  mkdirSync(v2)
  writeFileSync(join(v2, 'flags.json'), flagFile({ enableNewCheckout: { on: false } }))
  symlinkSync('..2026_11_27_v2', join(dir, '..data_tmp'))
  const started = Date.now()
  renameSync(join(dir, '..data_tmp'), join(dir, '..data')) // atomic swap
  rmSync(v1, { recursive: true })
  t.ok(await eventually(async () => (await send(proxy, '/checkout')).status === 503, 15_000), 'the swapped flags applied')
  t.comment(`applied after ${Date.now() - started} ms`)
})

t.test('flag file: DISABLED resolves to the code default; a missing file at start is picked up when it appears', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = tmp(t)
  const path = join(dir, 'flags.json')
  const { proxy, sidecar } = await startTestSidecar(t, {
    ...checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true, legacy: false }, flagSource: { type: 'flagd-file', path } })
  })
  t.equal((await send(proxy, '/checkout')).status, 200, 'started on featureFlags without the file')
  writeFileSync(path, flagFile({ enableNewCheckout: { state: 'DISABLED', on: false }, legacy: { state: 'DISABLED', on: true }, brandNew: { state: 'DISABLED' } }))
  t.ok(await eventually(() => sidecar.flags.values.has('brandNew'), 2000), 'the file appeared and was read')
  t.equal(sidecar.flags.enabled('enableNewCheckout'), true, 'DISABLED with defaultVariant off is NOT off: the code default applies')
  t.equal(sidecar.flags.enabled('legacy'), false, 'DISABLED falls back to the featureFlags value')
  t.equal(sidecar.flags.enabled('brandNew'), true, 'DISABLED and not in featureFlags: on')
  t.equal((await send(proxy, '/checkout')).status, 200)
})

t.test('validate warns about DISABLED flags in the flag file', async (t) => {
  const dir = tmp(t)
  const path = join(dir, 'flags.json')
  writeFileSync(path, flagFile({ enableNewCheckout: { state: 'DISABLED', on: false } }))
  const { warnings } = resolveConfig({ service: 's', upstreams: { a: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'a', killSwitch: 'enableNewCheckout' }], flagSource: { type: 'flagd-file', path } })
  t.ok(warnings.some((w) => w.includes('enableNewCheckout') && w.includes('DISABLED')), warnings.join('\n'))
})

t.test('a reload that changes featureFlags applies to the next request', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const base = checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true } })
  const { proxy, sidecar, stateDir, ops } = await startTestSidecar(t, base)
  t.equal((await send(proxy, '/checkout')).status, 200)
  const { config } = resolveConfig(testSidecarInput(checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: false } }), stateDir))
  await sidecar.apply(config)
  t.equal((await send(proxy, '/checkout')).status, 503)
  t.equal((await getJson(`${ops}/health`)).status, 200, 'a killed feature is not an unhealthy instance')
})

t.test('a kill that lands while a request is still on its way in stops it before the upstream', async (t) => {
  t.test('a small body still arriving', async (t) => {
    const up = await startUpstream()
    t.teardown(up.close)
    const s = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: { enableNewCheckout: true } }))
    const socket = connect(s.proxyPort, '127.0.0.1')
    t.teardown(() => socket.destroy())
    let answer = ''
    socket.on('data', (c: Buffer) => { answer += c.toString('latin1') })
    socket.write('POST /checkout/pay HTTP/1.1\r\nHost: shop\r\nContent-Length: 10\r\nConnection: close\r\n\r\n12345')
    t.ok(await eventually(() => s.sidecar.dataPlane.stats.receiving === 1), 'the sidecar is reading the body')
    t.equal((await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'checkout corrupts orders' })).status, 200)
    socket.write('67890')
    await once(socket, 'close')
    t.match(answer, /^HTTP\/1\.1 503 [^]*x-breakwater-error: feature_disabled/, 'refused as killed')
    t.equal(up.received.length, 0, 'the killed feature saw nothing')
  })

  t.test('a retry after the kill', async (t) => {
    let release: (() => void) | null = null
    const up = await startUpstream((req, res) => {
      if (release === null) { release = () => { res.writeHead(503).end() }; return }
      res.end('second attempt')
    })
    t.teardown(up.close)
    const s = await startTestSidecar(t, {
      upstreams: { app: { url: up.url } },
      routes: [{ name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'enableNewCheckout', retries: { attempts: 2, budgetPercent: 100 } }],
      featureFlags: { enableNewCheckout: true }
    })
    const reply = send(s.proxy, '/checkout/cart')
    t.ok(await eventually(() => release !== null), 'the first attempt reached the upstream')
    t.equal((await admin(s.admin, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'checkout corrupts orders' })).status, 200)
    ;(release as unknown as () => void)()
    const r = await reply
    t.equal(up.received.length, 1, 'no attempt after the kill')
    t.equal(r.status, 503)
    t.equal(r.headers['x-breakwater-error'], 'feature_disabled')
  })
})

t.test('a kill switch flag dropped from the flag file comes back on with a log line, a change and its metric, not silently', async (t) => {
  const path = join(flagDir(t), 'flags.json')
  writeFlagFile(path, { enableNewCheckout: { defaultVariant: 'off' } })
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, checkoutRoutes(up.url, { featureFlags: {}, flagSource: { type: 'flagd-file', path, pollIntervalMs: 50 } }))
  t.equal((await send(s.proxy, '/checkout')).status, 503, 'killed in the file')
  writeFlagFile(path, { somethingElse: {} })
  t.ok(await eventually(async () => (await send(s.proxy, '/checkout')).status === 200), 'dropped from the file: the code default, on')
  t.ok(s.logs.some((l) => l.event === 'flag_changed' && l.flag === 'enableNewCheckout' && l.enabled === true), 'said in a flag_changed line')
  t.ok(s.sidecar.flags.changes.some((c) => c.flag === 'enableNewCheckout' && c.enabled), 'recorded as a change (triage)')
  t.match(await (await fetch(`${s.ops}/metrics`)).text(), /breakwater_flag_enabled\{flag="enableNewCheckout"\} 1/, 'the kill switch\'s flag still has its metric')
})
