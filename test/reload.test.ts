/**
 * A reload keeps what is running (SPEC §15): bulkhead counts, breaker state, route stats and
 * trigger windows, and connection pools of unchanged upstreams and routes carry over; changed
 * upstreams start fresh; removed ones are released once their requests finish.
 */
import t from 'tap'
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startUpstream, echo, status, type TestUpstream } from './helpers/upstream.js'
import { startFileSidecar, type FileSidecar } from './helpers/file-sidecar.js'
import { admin } from './helpers/admin.js'
import { signalActor } from '../src/sidecar.js'
import { send, eventually, type Reply } from './helpers/http.js'
import { metricValue, scrape, hasSample } from './helpers/metrics.js'
import { startCaptured, testSidecarInput, oneRoute } from './helpers/sidecar.js'
import { loadConfigFile } from '../src/config/load.js'

/** An upstream whose `/held` requests wait until `release()`, counting the TCP connections it accepts. */
async function startCountingUpstream (): Promise<TestUpstream & { held: () => number, release: () => void, connections: () => number, open: () => number }> {
  const waiting: Array<() => void> = []
  const up = await startUpstream((req: IncomingMessage, res: ServerResponse, body: Buffer) => {
    if (req.url?.endsWith('/held') === true) waiting.push(() => echo(req, res, body))
    else echo(req, res, body)
  })
  let connections = 0
  const open = new Set<Socket>()
  up.server.on('connection', (s: Socket) => {
    connections++
    open.add(s)
    s.on('close', () => open.delete(s))
  })
  return Object.assign(up, {
    held: () => waiting.length,
    release: () => { for (const answer of waiting.splice(0)) answer() },
    connections: () => connections,
    open: () => open.size
  })
}

async function reload (s: FileSidecar, input: Record<string, unknown>): Promise<void> {
  s.rewrite(input)
  const result = await admin(s.admin, 'POST', '/v1/reload', { reason: 'test reload' })
  if (result.status !== 200) throw new Error(`reload refused: ${JSON.stringify(result.body)}`)
}

/** Settles `request` into a status (or the error code), never rejects. */
async function outcome (request: Promise<Reply>): Promise<{ status: number, error: string | null }> {
  return await request.then((r) => ({ status: r.status, error: r.headers['x-breakwater-error'] as string ?? null }), (err: NodeJS.ErrnoException) => ({ status: 0, error: err.code ?? err.message }))
}

t.test('the bulkhead count carries over a reload: requests still running count against the new runtime', async (t) => {
  const up = await startCountingUpstream()
  t.teardown(async () => { up.release(); await up.close() })
  const input = {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }],
    circuitBreakers: { app: { maxConcurrentRequests: 2 } }
  }
  const s = await startFileSidecar(t, input)
  const running = [outcome(send(s.proxy, '/held')), outcome(send(s.proxy, '/held'))]
  t.ok(await eventually(() => up.held() === 2, 10_000), 'the upstream holds two requests')
  t.same(await outcome(send(s.proxy, '/third')), { status: 503, error: 'bulkhead_full' }, 'the bulkhead is full before the reload')

  await reload(s, { ...input, featureFlags: { unrelated: true } })
  const third = outcome(send(s.proxy, '/held'))
  let settled = false
  void third.then(() => { settled = true })
  // On a runtime that restarted the count at 0 the request reaches the upstream instead.
  await eventually(() => settled || up.held() === 3, 10_000)
  t.equal(up.held(), 2, 'no third request reached the upstream after the reload')
  up.release()
  t.same(await third, { status: 503, error: 'bulkhead_full' }, 'after the reload the bulkhead is still full')
  for (const r of await Promise.all(running)) t.equal(r.status, 200, 'the held requests complete')
  t.equal((await outcome(send(s.proxy, '/after'))).status, 200, 'once they finished, the bulkhead admits again')
  t.equal(s.sidecar.dataPlane.runtime.upstreams.get('app')?.inFlight, 0, 'the count went back to 0')
})

t.test('an open circuit stays open over a reload of unchanged settings; a changed upstream gets a fresh one', async (t) => {
  const failing = await startUpstream(status(503))
  t.teardown(failing.close)
  const healthy = await startUpstream(echo)
  t.teardown(healthy.close)
  const input = (url: string): Record<string, unknown> => ({
    upstreams: { app: { url } },
    routes: [{ name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }],
    circuitBreakers: { app: { volumeThreshold: 2, failureThreshold: 0.5, recoveryTimeout: '1h' } }
  })
  const s = await startFileSidecar(t, input(failing.url))
  t.ok(await eventually(async () => (await outcome(send(s.proxy, '/'))).error === 'circuit_open', 10_000), 'failures open the circuit')
  const seen = failing.received.length

  await reload(s, { ...input(failing.url), routes: [{ name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }, { name: 'extra', match: { pathPrefix: '/extra' }, upstream: 'app' }] })
  t.same(await outcome(send(s.proxy, '/')), { status: 503, error: 'circuit_open' }, 'still open after the reload')
  t.equal(failing.received.length, seen, 'the failing upstream saw nothing more')
  t.equal(s.sidecar.dataPlane.circuit('app')?.state, 'open')

  // The operator points the upstream elsewhere: its definition changed, its history is not its own.
  await reload(s, input(healthy.url))
  t.same(await outcome(send(s.proxy, '/')), { status: 200, error: null }, 'the changed upstream starts with a closed circuit')
  t.equal(healthy.received.length, 1)
})

t.test('a reload that closes an open circuit by changing its settings says so: a circuit_closed line and a counted transition', async (t) => {
  const failing = await startUpstream(status(503))
  t.teardown(failing.close)
  const input = (recoveryTimeout: string): Record<string, unknown> => ({
    upstreams: { app: { url: failing.url } },
    routes: [{ name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }],
    circuitBreakers: { app: { volumeThreshold: 2, failureThreshold: 0.5, recoveryTimeout } }
  })
  const s = await startFileSidecar(t, input('1h'))
  t.ok(await eventually(async () => (await outcome(send(s.proxy, '/'))).error === 'circuit_open', 10_000), 'failures open the circuit')
  const closes = (): Array<Record<string, unknown>> => s.logs.filter((l) => l.event === 'circuit_closed' && l.upstream === 'app')
  t.equal(await metricValue(s.ops, 'breakwater_circuit_transitions_total', { upstream: 'app', state: 'closed' }), 0)

  await reload(s, input('2h'))
  t.equal((await outcome(send(s.proxy, '/'))).status, 503, 'the fresh breaker lets traffic through to the failing upstream')
  t.equal(s.sidecar.dataPlane.circuit('app')?.automaticState, 'closed')
  t.equal(closes().length, 1, 'one circuit_closed line: the last word on the circuit is not "open" any more')
  t.match(closes()[0], { level: 'warn', state: 'closed', from: 'open', cause: 'reload' })
  t.equal(await metricValue(s.ops, 'breakwater_circuit_transitions_total', { upstream: 'app', state: 'closed' }), 1, 'counted as a transition to closed')

  // A reload that keeps the (now closed) breaker as it is says nothing.
  await reload(s, input('2h'))
  t.equal(closes().length, 1)
  t.equal(await metricValue(s.ops, 'breakwater_circuit_transitions_total', { upstream: 'app', state: 'closed' }), 1)
})

t.test('an operator\'s forced circuit survives a reload that changes the upstream', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const input = (connectTimeoutMs: number): Record<string, unknown> => ({
    upstreams: { app: { url: up.url, connectTimeoutMs } },
    routes: [{ name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }],
    circuitBreakers: { app: {} }
  })
  const s = await startFileSidecar(t, input(1000))
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'isolate' })).status, 200)
  await reload(s, input(2000))
  t.same(await outcome(send(s.proxy, '/')), { status: 503, error: 'circuit_open' }, 'the forced circuit is still open')
  t.equal(up.received.length, 0)
})

t.test('route counts and trigger windows continue over a reload; a removed route frees them', async (t) => {
  const up = await startCountingUpstream()
  t.teardown(up.close)
  const routes = [
    { name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }
  ]
  const input = { upstreams: { app: { url: up.url } }, routes: [{ name: 'old', match: { pathPrefix: '/old' }, upstream: 'app' }, ...routes] }
  const s = await startFileSidecar(t, input)
  for (let i = 0; i < 3; i++) t.equal((await send(s.proxy, '/x')).status, 200)
  t.equal((await send(s.proxy, '/old')).status, 200)
  const stats = [...s.sidecar.dataPlane.stats.allRoutes()].find((r) => r.route === 'main')

  // A changed route setting (a timeout) keeps the route's identity: its name and upstream.
  await reload(s, { ...input, routes: [input.routes[0], { ...routes[0], timeoutMs: 9000 }] })
  t.equal((await send(s.proxy, '/y')).status, 200)
  t.equal(await metricValue(s.ops, 'breakwater_requests_total', { route: 'main' }), 4, 'the request counter continued')
  t.equal([...s.sidecar.dataPlane.stats.allRoutes()].find((r) => r.route === 'main'), stats, 'the same stats and window serve the route')
  const triage = (await admin(s.admin, 'GET', '/v1/triage')).body as { evidence: { routes: Array<{ name: string, current: { requests: number } }> } }
  t.equal(triage.evidence.routes.find((r) => r.name === 'main')?.current.requests, 4, 'the window holds the requests from before the reload')

  await reload(s, { ...input, routes })
  t.notOk([...s.sidecar.dataPlane.stats.allRoutes()].some((r) => r.route === 'old'), 'the removed route\'s stats and window are freed')
  t.notOk(hasSample(await scrape(s.ops), 'breakwater_requests_total', { route: 'old' }), 'and its series leave /metrics')
})

t.test('pools: no new connection for an unchanged upstream; a changed one gets a fresh pool; a removed one closes after its requests', async (t) => {
  const app = await startCountingUpstream()
  t.teardown(app.close)
  const other = await startCountingUpstream()
  t.teardown(async () => { other.release(); await other.close() })
  const base = {
    upstreams: { app: { url: app.url, keepAliveTimeoutMs: '30s' }, other: { url: other.url, keepAliveTimeoutMs: '30s' } },
    routes: [{ name: 'other', match: { pathPrefix: '/other' }, upstream: 'other' }, { name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }]
  }
  const s = await startFileSidecar(t, base)
  t.equal((await send(s.proxy, '/a')).status, 200)
  // The start-up probe that the local app accepts connections (test/reachability.test.ts), and the pool's.
  t.ok(await eventually(() => app.connections() === 2, 10_000), 'two connections to the app')

  await reload(s, { ...base, featureFlags: { unrelated: true }, logging: { level: 'debug' } })
  t.same(s.logs.filter((l) => l.event === 'config_reload').at(-1)?.upstreams, { kept: ['app', 'other'], fresh: [], removed: [] })
  t.equal((await send(s.proxy, '/b')).status, 200)
  t.equal(app.connections(), 2, 'the reload opened no new connection to the unchanged upstream')

  // `other` has a request running when a reload removes it.
  const held = outcome(send(s.proxy, '/other/held'))
  t.ok(await eventually(() => other.held() === 1, 10_000), 'the other upstream holds a request')
  await reload(s, { upstreams: { app: { url: app.url, keepAliveTimeoutMs: '20s' } }, routes: [base.routes[1]] })
  t.equal((await send(s.proxy, '/c')).status, 200)
  t.equal(app.connections(), 3, 'the changed upstream connected afresh')
  const logged = s.logs.filter((l) => l.event === 'config_reload' && l.result === 'ok').at(-1)
  t.same(logged?.upstreams, { kept: [], fresh: ['app'], removed: ['other'] }, 'the reload logs which upstreams kept their state')
  t.ok(await eventually(() => app.open() === 1, 10_000), 'and the old pool closed its idle connection')

  t.equal(other.open(), 1, 'the removed upstream\'s connection stays while its request runs')
  other.release()
  t.same(await held, { status: 200, error: null }, 'the request on the removed upstream completed')
  t.ok(await eventually(() => other.open() === 0, 10_000), 'then the removed upstream\'s pool closed')
})

t.test('an operator\'s forced circuit survives a reload that removes its upstream, and is in force again when a reload brings it back', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const withPay = {
    upstreams: { app: { url: up.url }, pay: { url: up.url } },
    routes: [{ name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay' }, { name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }],
    circuitBreakers: { pay: {} }
  }
  const withoutPay = { upstreams: { app: { url: up.url } }, routes: [{ name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }] }
  const s = await startFileSidecar(t, withPay)
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'isolate pay' })).status, 200)
  await reload(s, withoutPay)
  const absent = (await admin(s.admin, 'GET', '/v1/state')).body.circuits.pay
  t.match(absent, { forced: 'open', configured: false, forcedBy: { state: 'open', reason: 'isolate pay' } }, 'kept, and shown, while the upstream is gone')
  await reload(s, withPay)
  const back = (await admin(s.admin, 'GET', '/v1/state')).body.circuits.pay
  t.match(back, { state: 'open', forced: 'open', configured: true, forcedBy: { reason: 'isolate pay' } }, 'forced again once the upstream is back')
  t.same(await outcome(send(s.proxy, '/pay')), { status: 503, error: 'circuit_open' })
  t.equal(up.received.length, 0, 'nothing reached the upstream')
  // Handed back to automatic, it is gone for good.
  await reload(s, withoutPay)
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'auto', reason: 'pay retired' })).status, 200)
  t.notOk((await admin(s.admin, 'GET', '/v1/state')).body.circuits.pay, 'an operator may hand back a kept forced circuit')
  await reload(s, withPay)
  t.match((await admin(s.admin, 'GET', '/v1/state')).body.circuits.pay, { forced: null })
})

t.test('breakwater_info follows a reload that changes the version: one series, with the new label', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const input = (version: string): Record<string, unknown> => ({ service: 'checkout', version, upstreams: { app: { url: up.url } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] })
  const s = await startFileSidecar(t, input('1.0.0'))
  const infos = async (): Promise<Array<Record<string, string>>> => (await scrape(s.ops)).filter((m) => m.name === 'breakwater_info').map((m) => m.labels)
  t.same(await infos(), [{ service: 'checkout', version: '1.0.0' }])
  await reload(s, input('1.0.1'))
  t.equal((await admin(s.admin, 'GET', '/v1/state')).body.version, '1.0.1')
  t.same(await infos(), [{ service: 'checkout', version: '1.0.1' }], 'the old version\'s series is gone')
})

t.test('a reload that renames the service keeps the running name everywhere until the restart, and says so', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const input = { upstreams: { app: { url: up.url } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] }
  const s = await startFileSidecar(t, input)
  const serviceOf = async (): Promise<string | undefined> => (await scrape(s.ops)).find((m) => m.name === 'breakwater_info')?.labels.service
  const before = await serviceOf()
  t.ok(before !== undefined && before !== 'renamed-shop', `breakwater_info names the service (${String(before)})`)
  await reload(s, { ...input, service: 'renamed-shop' })
  t.ok(s.logs.some((l) => l.event === 'config_reload' && l.key === 'service' && l.wanted === 'renamed-shop' && l.level === 'warn'), 'the rename is deferred, with a warning')
  t.equal(await serviceOf(), before, 'breakwater_info keeps the name the log lines carry')
})

t.test('a reload that moves stateDir or changes admin settings keeps the running ones until the restart, and says so', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const input = { upstreams: { app: { url: up.url } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }], featureFlags: { newCheckout: true } }
  const s = await startFileSidecar(t, input)
  const elsewhere = join(s.stateDir, '..', 'elsewhere')
  await reload(s, { ...input, stateDir: elsewhere, admin: { tokenFile: join(s.stateDir, '..', 'token') } })
  t.ok(s.logs.some((l) => l.event === 'config_reload' && l.key === 'stateDir' && l.level === 'warn'), 'the stateDir change is deferred, with a warning')
  t.ok(s.logs.some((l) => l.event === 'config_reload' && l.key === 'admin' && l.level === 'warn'), 'the admin change is deferred, with a warning')
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'after the reload' })).status, 200, 'the running token still works')
  t.equal((await admin(s.admin, 'POST', '/v1/reload', { reason: 'again' })).status, 200)
  // What the control plane wrote stays in the one stateDir it locked at start.
  const state = JSON.parse(readFileSync(join(s.stateDir, 'state.json'), 'utf8')) as { overrides: Record<string, unknown> }
  t.ok(state.overrides.newCheckout !== undefined, 'the override is in the running stateDir')
  t.equal((await admin(s.admin, 'GET', '/v1/state')).body.flags.newCheckout.enabled, false)
})

t.test('a reload during a drain is refused (409 draining, logged, audited like every refused call, SIGHUP\'s too): it would restart the probes the shutdown stops', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const input = {
    upstreams: { app: { url: up.url, healthCheck: { path: '/h', intervalMs: '1s' } } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    shutdown: { drainDelayMs: 1000, timeoutMs: 2000 }
  }
  const sc = await startFileSidecar(t, input)
  const stopped = sc.sidecar.shutdown()
  const r = await admin(sc.admin, 'POST', '/v1/reload', { reason: 'edited' })
  t.equal(r.status, 409, 'refused while draining')
  t.equal(r.body.error, 'draining')
  t.ok(sc.logs.some((l) => l.event === 'config_reload' && l.result === 'refused' && l.why === 'draining'), 'and logged')
  // What main does on SIGHUP.
  const signalled = await sc.sidecar.reload(signalActor('SIGHUP'))
  t.match(signalled, { ok: false, draining: true }, 'a SIGHUP while draining is refused too')
  t.notOk(sc.logs.some((l) => l.event === 'config_reload' && l.result === 'ok'), 'nothing was applied')
  await stopped
  const log = join(sc.stateDir, 'audit.jsonl')
  const audited = (existsSync(log) ? readFileSync(log, 'utf8') : '').split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Record<string, unknown>)
  t.match(audited.filter((e) => e.wanted === 'config.reload'), [
    { action: 'refused', wanted: 'config.reload', result: 'draining', status: 409, reason: 'edited', targets: [sc.configPath] },
    { action: 'refused', wanted: 'config.reload', result: 'draining', status: 409, requester: 'signal:SIGHUP', reason: /SIGHUP/, targets: [sc.configPath] }
  ], 'both refusals are in the audit log: who tried, what, and why it did not happen')
})

t.test('two reloads at once: the one asked last reads the file last, so what runs is the file as it is now', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  // A module config whose export is a function: reading one edit of it can be held while the
  // file is edited again and reloaded (a slow read, a flag provider that takes its time).
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-reloads-'))
  const configPath = join(dir, 'breakwater.mjs')
  const gate = { entered: false, open: () => {}, opened: Promise.resolve() }
  gate.opened = new Promise<void>((resolve) => { gate.open = resolve })
  const global = globalThis as { reloadGate?: typeof gate }
  global.reloadGate = gate
  t.teardown(() => { gate.open(); delete global.reloadGate })
  const write = (version: string, held: boolean): void => {
    const input = JSON.stringify(testSidecarInput({ ...oneRoute(up.url), version }, join(dir, 'state')))
    writeFileSync(configPath, `const input = ${input}\nexport default async () => {${held ? ' globalThis.reloadGate.entered = true; await globalThis.reloadGate.opened;' : ''} return input }\n`)
  }
  write('1.0.0', false)
  const s = await startCaptured(t, (await loadConfigFile(configPath)).config, dir)

  write('2.0.0', true)
  const first = admin(s.admin, 'POST', '/v1/reload', { reason: 'first edit' })
  t.ok(await eventually(() => gate.entered, 10_000), 'the first reload is reading the file')
  write('3.0.0', false)
  const second = admin(s.admin, 'POST', '/v1/reload', { reason: 'second edit' })
  let secondDone = false
  void second.then(() => { secondDone = true })
  // Read on its own, the second edit is applied at once; the first one is still being read.
  await eventually(() => secondDone, 2000)
  gate.open()
  t.equal((await first).status, 200, 'the first reload is applied')
  t.equal((await second).status, 200, 'the second reload is applied')
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.equal(state.body.version, '3.0.0', 'the config in force is the file as it is now, not the edit read first and applied last')
  t.equal(s.sidecar.config.version, '3.0.0')
})
