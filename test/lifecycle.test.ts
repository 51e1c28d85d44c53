import t from 'tap'
import { readFileSync, writeFileSync, existsSync } from 'node:fs'
import { join } from 'node:path'
import type { IncomingMessage, ServerResponse } from 'node:http'
import { Client } from 'undici'
import { parse, stringify } from 'yaml'
import { startUpstream, echo, hang, type TestUpstream } from './helpers/upstream.js'
import { startProcessWithin, spawnCli, tempDir, writeProcessConfig, withoutTapHooks, type Running } from './helpers/process.js'
import { oneRoute, startTestSidecar } from './helpers/sidecar.js'
import { send, getJson, eventually } from './helpers/http.js'
import { metricValue } from './helpers/metrics.js'
import { WireClient } from './helpers/wire.js'
import { ROOT } from './helpers/root.js'
import { startWebSocketUpstream, handshakeRequest } from './helpers/websocket.js'

/** Resolve with `promise`, or reject naming `what` after `ms`. */
async function within<T> (promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms) })
  try {
    return await Promise.race([promise, late])
  } finally {
    clearTimeout(timer)
  }
}

/** An upstream whose `/held` requests wait until `release()`; everything else is echoed. */
async function startHoldingUpstream (): Promise<TestUpstream & { held: () => number, release: () => void }> {
  const waiting: Array<() => void> = []
  const up = await startUpstream((req: IncomingMessage, res: ServerResponse, body: Buffer) => {
    if (req.url === '/held') waiting.push(() => echo(req, res, body))
    else echo(req, res, body)
  })
  return Object.assign(up, {
    held: () => waiting.length,
    release: () => { for (const answer of waiting.splice(0)) answer() }
  })
}

/** Generous: the binary loads slowly on a busy machine. */
const STARTUP_MS = 30_000

// Each test runs its own process and mostly waits on timers: run them side by side.
t.jobs = 2

const logTime = (line: Record<string, unknown>): number => Date.parse(String(line.time))

t.test('SIGTERM: draining at once, serving through drainDelayMs, then stop accepting, finish in-flight, exit 0', async (t) => {
  const up = await startHoldingUpstream()
  t.teardown(up.close)
  const bw = await startProcessWithin(t, { ...oneRoute(up.url), shutdown: { drainDelayMs: 2500, timeoutMs: 15000 } }, STARTUP_MS, withoutTapHooks)

  const before = await getJson(`${bw.ops}/health`)
  t.equal(before.status, 200, '/health is 200 before the signal')
  t.same(before.body, { status: 'ok' })

  // A request in flight across the whole shutdown.
  const inFlight = send(bw.proxy, '/held')
  t.ok(await eventually(() => up.held() === 1, 5000), 'the upstream holds one request')

  bw.child.kill('SIGTERM')
  let health: { status: number, body: unknown } = { status: 0, body: null }
  t.ok(await eventually(async () => { health = await getJson(`${bw.ops}/health`); return health.status === 503 }, 5000, 10), '/health turns 503')
  t.same(health.body, { status: 'draining' })
  t.notOk(bw.lines.some((l) => l.phase === 'stopped_accepting'), '/health said draining while the proxy still accepted connections')

  // Still serving during drainDelayMs, keep-alive included (SPEC §14: the load balancer is
  // taking the pod out; sending clients to reconnect now only sends them to a closing listener).
  const during = await send(bw.proxy, '/during')
  t.equal(during.status, 200, 'the proxy still serves while draining')
  t.equal(during.headers.connection, 'keep-alive', 'keep-alive stays during drainDelayMs')
  t.same((await getJson(`${bw.ops}/ready`)).body, { status: 'draining' }, '/ready says draining too')
  t.equal((await getJson(`${bw.ops}/live`)).status, 200, '/live stays 200 while draining')

  const draining = await bw.waitForLine((l) => l.phase === 'draining')
  const stopped = await bw.waitForLine((l) => l.phase === 'stopped_accepting', 15000)
  t.ok(logTime(stopped) - logTime(draining) >= 2400, 'the listener kept accepting for drainDelayMs', { draining: draining.time, stopped: stopped.time })
  t.equal(stopped.inFlight, 1, 'one request in flight when the listener closed')
  await t.rejects(send(bw.proxy, '/after'), { code: 'ECONNREFUSED' }, 'new connections are refused after the drain delay')
  t.equal(bw.child.exitCode, null, 'still running while a request is in flight')
  t.equal((await getJson(`${bw.ops}/health`)).status, 503, '/health still answers, draining')

  up.release()
  const finished = await within(inFlight, 10000, 'the in-flight request')
  t.equal(finished.status, 200, 'the in-flight request completed')
  t.equal(finished.json<{ url: string }>().url, '/held')
  t.equal(finished.headers.connection, 'close')

  const code = await within(bw.exited, 10000, 'process exit')
  t.equal(code, 0, 'exit 0')
  const last = bw.lines.find((l) => l.phase === 'stopped')
  t.equal(last?.abandoned, 0, 'no request abandoned')
})

t.test('the egress listener keeps keep-alive through the drain: only the proxy listener\'s responses carry Connection: close', async (t) => {
  const up = await startHoldingUpstream()
  t.teardown(up.close)
  const local = { host: '127.0.0.1', port: 0 }
  const { sidecar, proxy } = await startTestSidecar(t, {
    listen: { proxy: local, egress: local, ops: local, admin: local },
    upstreams: { app: { url: up.url }, dependency: { url: up.url } },
    routes: [
      { name: 'outbound', listener: 'egress', match: { pathPrefix: '/' }, upstream: 'dependency' },
      { name: 'inbound', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    shutdown: { drainDelayMs: 0, timeoutMs: 30000 }
  })
  // A request in flight on the proxy listener holds the drain open after it stops accepting.
  const inFlight = send(proxy, '/held')
  t.ok(await eventually(() => up.held() === 1, 5000), 'the upstream holds one request')
  const stopping = sidecar.shutdown()
  t.ok(await eventually(() => sidecar.dataPlane.draining, 5000), 'the proxy listener stopped accepting')

  // The app's own calls through egress, on one keep-alive connection, while the drain runs.
  const app = new Client(sidecar.addresses.egress as string)
  t.teardown(async () => { await app.destroy() })
  for (const path of ['/first', '/second']) {
    const res = await app.request({ path, method: 'GET' })
    await res.body.text()
    t.equal(res.statusCode, 200, `${path}: the egress listener serves while draining`)
    t.not(res.headers.connection, 'close', `${path}: no Connection: close on egress (the app's connection stays)`)
  }

  up.release()
  const finished = await within(inFlight, 10000, 'the in-flight request')
  t.equal(finished.headers.connection, 'close', 'the proxy listener\'s response still says Connection: close')
  await within(stopping, 20000, 'the shutdown')
})

t.test('a second SIGTERM during the drain makes the process exit promptly, still 0', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const bw = await startProcessWithin(t, { ...oneRoute(up.url), shutdown: { drainDelayMs: 60000, timeoutMs: 60000 } }, STARTUP_MS, withoutTapHooks)
  bw.child.kill('SIGTERM')
  await bw.waitForLine((l) => l.phase === 'draining')
  t.equal((await send(bw.proxy, '/')).status, 200, 'draining, still serving')
  const at = Date.now()
  bw.child.kill('SIGTERM')
  // Well before the 60 s drain delay: the second signal cut the drain short.
  const code = await within(bw.exited, 45_000, 'exit after the second SIGTERM, not after the 60 s drain delay')
  t.equal(code, 0)
  const hurried = bw.lines.find((l) => l.phase === 'hurried')
  t.equal(hurried?.level, 'warn', 'the cut-short drain is logged at warn')
  t.equal(hurried?.signal, 'SIGTERM')
  t.comment(`exited ${Date.now() - at} ms after the second signal`)
})

t.test('requests still in flight after shutdown.timeoutMs are cut; the process exits 0', async (t) => {
  const up = await startUpstream(hang)
  t.teardown(up.close)
  // The tear-down after the cut gets a tenth of timeoutMs, at most TEARDOWN_MS (1 s), before the
  // backstop exits 1. 10 s gives it the whole second, as with the defaults: with 1 s it had
  // 100 ms, which a busy machine overran (exit 1, no 'stopped' line).
  const drainDelayMs = 100
  const timeoutMs = 10_000
  const bw = await startProcessWithin(t, { ...oneRoute(up.url), shutdown: { drainDelayMs, timeoutMs } }, STARTUP_MS, withoutTapHooks)
  const stuck = send(bw.proxy, '/stuck').then((r) => ({ status: r.status }), (err: NodeJS.ErrnoException) => ({ error: err.code ?? err.message }))
  t.ok(await eventually(() => up.received.length === 1, 5000), 'the upstream got the request')
  const at = Date.now()
  bw.child.kill('SIGTERM')
  const code = await within(bw.exited, timeoutMs + 10_000, 'exit after shutdown.timeoutMs')
  const took = Date.now() - at
  t.equal(code, 0, 'exit 0')
  // The cut comes at drainDelayMs + timeoutMs less the tear-down's share.
  t.ok(took >= drainDelayMs + timeoutMs - 1000, `waited for the shutdown deadline before cutting (${took} ms)`)
  const outcome = await within(stuck, 5000, 'the cut request settles')
  t.ok('error' in outcome, 'the client saw its connection cut, not a response', { outcome })
  const last = bw.lines.find((l) => l.phase === 'stopped')
  t.equal(last?.abandoned, 1, 'the cut request is logged as abandoned')
  // The sidecar cut it, not the app: never an upstream failure in the access log (SPEC §15).
  const access = bw.lines.find((l) => l.msg === 'request' && l['url.path'] === '/stuck')
  t.equal(access?.outcome, 'breakwater', 'the cut is the sidecar\'s doing')
  t.equal(access?.['error.type'], 'shutdown_deadline')
})

t.test('a WebSocket tunnel still open at the shutdown deadline is cut and logged as such', async (t) => {
  const up = await startWebSocketUpstream()
  t.teardown(up.close)
  const bw = await startProcessWithin(t, { ...oneRoute(up.url), shutdown: { drainDelayMs: 100, timeoutMs: 3000 } }, STARTUP_MS, withoutTapHooks)
  const client = await WireClient.connect(Number(new URL(bw.proxy).port))
  t.teardown(() => client.destroy())
  client.write(handshakeRequest('/ws', 'dGhlIHNhbXBsZSBub25jZQ=='))
  await client.until((c) => c.received.startsWith('HTTP/1.1 101'), 5000, 'the 101')
  bw.child.kill('SIGTERM')
  const stopped = await bw.waitForLine((l) => l.phase === 'stopped_accepting')
  t.equal(stopped.tunnels, 1, 'the open tunnel is counted when the listener closes')
  t.equal(await within(bw.exited, 15_000, 'process exit'), 0, 'exit 0')
  await client.until((c) => c.closed, 5000, 'the tunnel closed')
  const deadline = bw.lines.find((l) => l.phase === 'deadline')
  t.ok(deadline !== undefined, 'the cut is logged')
  t.equal(deadline?.level, 'warn')
  t.equal(deadline?.tunnels, 1, 'one tunnel cut')
  t.equal(deadline?.abandoned, 0, 'no request cut')
  t.equal(bw.lines.find((l) => l.phase === 'stopped')?.tunnels, 1)
})

t.test('a SIGHUP during start-up does not kill the sidecar: it reloads once started', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const marker = join(tempDir(t), 'initialising')
  const { dir, configPath } = writeProcessConfig(t, {
    ...oneRoute(up.url),
    flagProvider: { module: join(ROOT, 'test/fixtures/slow-provider.mjs'), export: 'SlowProvider', options: { marker, delayMs: 2000 } }
  })
  const bw = await spawnCli(t, ['--config', configPath, 'start'], dir, configPath, withoutTapHooks)
  t.ok(await eventually(() => existsSync(marker), STARTUP_MS, 20), 'start-up is under way')
  bw.child.kill('SIGHUP')
  await bw.waitForLine((l) => l.msg === 'listening', STARTUP_MS)
  const reloaded = await bw.waitForLine((l) => l.event === 'config_reload')
  t.equal(reloaded.result, 'ok', 'the signal is honoured once the sidecar runs')
  bw.child.kill('SIGTERM')
  t.equal(await within(bw.exited, 30_000, 'process exit'), 0)
})

t.test('a drain under 50 busy keep-alive connections loses no request', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const bw = await startProcessWithin(t, { ...oneRoute(up.url), shutdown: { drainDelayMs: 1000, timeoutMs: 10000 } }, STARTUP_MS, withoutTapHooks)
  // Clients as real ones behave: one keep-alive connection each, requests back to back; on
  // `Connection: close` (or a connection closed before a request was written) undici opens a
  // new connection. A refused connection means nothing was sent: a real client would go to
  // another replica, so that client stops. Any other error lost a request that was sent.
  let signalled = false
  const tally = { answered: 0, answeredDuringDrain: 0, refused: 0, reconnectsDuringDrain: 0, lost: [] as string[] }
  const clients = Array.from({ length: 50 }, () => new Client(bw.proxy, { keepAliveTimeout: 60_000, keepAliveMaxTimeout: 60_000 }))
  for (const c of clients) c.on('connect', () => { if (signalled) tally.reconnectsDuringDrain++ })
  t.teardown(async () => { await Promise.all(clients.map(async (c) => await c.destroy())) })
  const sending = clients.map(async (client, i) => {
    for (let n = 0; ; n++) {
      try {
        const res = await client.request({ path: `/c${i}/${n}`, method: n % 3 === 0 ? 'POST' : 'GET', body: n % 3 === 0 ? 'order' : undefined })
        await res.body.text()
        if (res.statusCode !== 200) tally.lost.push(`status ${res.statusCode}`)
        tally.answered++
        if (signalled) tally.answeredDuringDrain++
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code ?? (err as Error).message
        if (code === 'ECONNREFUSED') tally.refused++
        else tally.lost.push(code)
        return
      }
    }
  })
  t.ok(await eventually(() => tally.answered >= 500, 30_000), 'traffic flows on every connection')
  bw.child.kill('SIGTERM')
  signalled = true
  const code = await within(bw.exited, 20_000, 'process exit')
  await within(Promise.all(sending), 10_000, 'every client to stop')
  t.equal(code, 0, 'exit 0')
  t.same(tally.lost, [], 'no request was lost')
  t.ok(tally.answeredDuringDrain > 0, 'requests were served during the drain', tally)
  t.equal(tally.refused, 50, 'each client stopped only when the listener refused a new connection')
  t.equal(tally.reconnectsDuringDrain, 0, 'keep-alive stayed through drainDelayMs: no client had to reconnect')
  t.equal(bw.lines.find((l) => l.phase === 'stopped')?.abandoned, 0, 'nothing abandoned')
})

t.test('with the default shutdown settings, SIGTERM to exit fits the 30 s grace of Kubernetes whatever clients do', async (t) => {
  const up = await startUpstream(hang)
  t.teardown(up.close)
  // Route and idle timeouts longer than the grace: only the shutdown deadline can end these.
  const bw = await startProcessWithin(t, oneRoute(up.url, { timeoutMs: '2m', idleTimeoutMs: '2m' }), STARTUP_MS, withoutTapHooks)
  const stuck = send(bw.proxy, '/hung').then((r) => ({ status: r.status }), (err: NodeJS.ErrnoException) => ({ error: err.code ?? err.message }))
  t.ok(await eventually(() => up.received.length === 1, 5000), 'the upstream holds one request and never answers')
  // And a client that promises a body and never sends it.
  const uploader = await WireClient.connect(Number(new URL(bw.proxy).port))
  t.teardown(() => uploader.destroy())
  uploader.write('POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nfirst bytes')
  const at = performance.now()
  bw.child.kill('SIGTERM')
  // The contract (SPEC §15): at most 25 s with defaults; 29 s leaves room for a busy machine
  // and stays under the 30 s after which Kubernetes kills the pod. The figure goes to bench/README.
  const code = await within(bw.exited, 29_000, 'exit after SIGTERM')
  t.comment(`SIGTERM to exit: ${Math.round(performance.now() - at)} ms with the default shutdown settings`)
  t.equal(code, 0, 'exit 0')
  const cut = bw.lines.find((l) => l.phase === 'deadline')
  t.equal(cut?.abandoned, 2, 'the requests still running at the deadline are cut and logged')
  t.equal(cut?.level, 'warn', 'at warn')
  t.ok('error' in await within(stuck, 5000, 'the cut request settles'), 'the client saw its connection cut')
})

/** Rewrite the running process's config file: its current content passed through `change`. */
function rewriteConfig (bw: Running, change: (config: Record<string, any>) => void): void {
  const config = parse(readFileSync(bw.configPath, 'utf8')) as Record<string, any>
  change(config)
  writeFileSync(bw.configPath, stringify(config))
}

async function reloaded (bw: Running, result: 'ok' | 'refused', count: number): Promise<Array<Record<string, unknown>>> {
  const matching = (): Array<Record<string, unknown>> => bw.lines.filter((l) => l.event === 'config_reload' && l.result === result)
  await eventually(() => matching().length >= count, 10000)
  return matching()
}

t.test('SIGHUP applies a valid config without dropping a connection, and refuses an invalid one', async (t) => {
  const who = (name: string) => (req: IncomingMessage, res: ServerResponse): void => {
    const body = JSON.stringify({ upstream: name, url: req.url, upstreamSidePort: req.socket.remotePort })
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
    res.end(body)
  }
  const a = await startUpstream(who('a'))
  t.teardown(a.close)
  const b = await startUpstream(who('b'))
  t.teardown(b.close)
  const bw = await startProcessWithin(t, {
    upstreams: { app: { url: a.url, keepAliveTimeoutMs: '30s' } },
    routes: [{ name: 'main', match: { pathPrefix: '/' }, upstream: 'app' }],
    shutdown: { drainDelayMs: 0, timeoutMs: 1000 }
  }, STARTUP_MS, withoutTapHooks)

  const client = new Client(bw.proxy, { keepAliveTimeout: 60_000, keepAliveMaxTimeout: 60_000 })
  t.teardown(async () => await client.destroy())
  let connects = 0
  client.on('connect', () => { connects++ })
  const get = async (path: string): Promise<{ status: number, body: { upstream: string, url: string, upstreamSidePort: number } }> => {
    const res = await client.request({ path, method: 'GET' })
    const text = await res.body.text()
    return { status: res.statusCode, body: res.statusCode === 200 ? JSON.parse(text) : text }
  }

  const first = await get('/x')
  t.equal(first.body.upstream, 'a')
  t.equal((await get('/new/1')).body.upstream, 'a', 'before the reload, /new is served by the catch-all')

  // 1. A new route to a new upstream.
  rewriteConfig(bw, (c) => {
    c.upstreams.other = { url: b.url }
    c.routes.unshift({ name: 'new', match: { pathPrefix: '/new' }, upstream: 'other' })
  })
  bw.child.kill('SIGHUP')
  await reloaded(bw, 'ok', 1)
  const routed = await get('/new/2')
  t.equal(routed.status, 200)
  t.equal(routed.body.upstream, 'b', 'the new route answers')
  const again = await get('/x')
  t.equal(again.body.upstream, 'a')
  t.equal(again.body.upstreamSidePort, first.body.upstreamSidePort, 'the warm connection to the unchanged upstream was kept')

  // 2. The catch-all's upstream moves.
  rewriteConfig(bw, (c) => { c.upstreams.app.url = b.url })
  bw.child.kill('SIGHUP')
  await reloaded(bw, 'ok', 2)
  t.equal((await get('/x')).body.upstream, 'b', 'the changed upstream is used')

  // 3. An invalid config is refused, and the running one keeps serving.
  rewriteConfig(bw, (c) => {
    c.routes[0].upstream = 'ghost'
    c.colour = 'blue'
  })
  bw.child.kill('SIGHUP')
  const [refused] = await reloaded(bw, 'refused', 1)
  t.equal(refused?.level, 'error', 'a refused reload is logged at error')
  const problems = refused?.problems as string[] | undefined
  t.ok(problems?.some((p) => p.startsWith('routes[0].upstream: ')), 'the problems name the key', { problems })
  t.ok(problems?.some((p) => p.startsWith('colour: ')), 'every problem is listed', { problems })
  t.equal((await get('/new/3')).body.upstream, 'b', 'the running config keeps serving')
  t.equal((await get('/x')).body.upstream, 'b')

  t.equal(connects, 1, 'one client connection across three reloads')
  t.equal(await metricValue(bw.ops, 'breakwater_config_reloads_total', { result: 'ok' }), 2, 'two reloads applied')
  t.equal(await metricValue(bw.ops, 'breakwater_config_reloads_total'), 3, 'and one refused (three in all)')
  t.equal(bw.child.exitCode, null, 'still running')

  // Every SIGHUP reload is in the audit log, as a POST /v1/reload is: who asked, and how it went.
  const audited = (): Array<Record<string, any>> => {
    try {
      return readFileSync(join(bw.dir, 'state', 'audit.jsonl'), 'utf8').split('\n').filter((l) => l !== '').map((l) => JSON.parse(l)).filter((e) => e.action === 'config.reload')
    } catch { return [] }
  }
  t.ok(await eventually(() => audited().length === 3, 10_000), 'three reloads audited')
  t.match(audited(), [
    { requester: 'signal:SIGHUP', reason: /SIGHUP/, result: 'ok', targets: [bw.configPath] },
    { requester: 'signal:SIGHUP', result: 'ok' },
    { requester: 'signal:SIGHUP', result: 'refused' }
  ])
  t.ok((audited()[2]?.problems as string[] | undefined)?.some((p) => p.startsWith('routes[0].upstream: ')), 'the refused reload\'s problems are audited')
})

t.test('requests cut because a second signal cut the drain short are not logged as cut by the shutdown deadline', async (t) => {
  const up = await startHoldingUpstream()
  t.teardown(up.close)
  const sc = await startTestSidecar(t, { ...oneRoute(up.url), shutdown: { drainDelayMs: 0, timeoutMs: 60000 } })
  const held = send(sc.proxy, '/held').catch(() => null)
  t.ok(await eventually(async () => up.held() === 1, 10_000), 'a request is in flight')
  const stopped = sc.sidecar.shutdown()
  t.ok(await eventually(async () => sc.logs.some((l) => l.phase === 'stopped_accepting'), 10_000))
  sc.sidecar.hurry()
  await stopped
  await held
  t.notOk(sc.logs.some((l) => l.event === 'shutdown' && l.phase === 'deadline'), 'no deadline was reached')
  const cut = sc.logs.find((l) => l.event === 'shutdown' && l.phase === 'cut')
  t.equal(cut?.abandoned, 1, 'the cut request is logged as cut short by the second signal')
  t.equal(cut?.level, 'warn', 'at warn')
})
