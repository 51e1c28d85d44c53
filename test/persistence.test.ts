import t, { type Test } from 'tap'
import { writeFileSync, readFileSync, readdirSync, mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { execFileSync } from 'node:child_process'
import { parse, stringify } from 'yaml'
import { startUpstream } from './helpers/upstream.js'
import { startProcess, spawnCli, tempDir, writeProcessConfig } from './helpers/process.js'
import { admin } from './helpers/admin.js'
import { send } from './helpers/http.js'

const TOKEN = 'persistence-test-token-0123456789'
const env = { BREAKWATER_ADMIN_TOKEN: TOKEN }

function config (url: string): Record<string, unknown> {
  return {
    upstreams: { app: { url }, pay: { url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'enableNewCheckout' },
      { name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay' },
      { match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { enableNewCheckout: true },
    circuitBreakers: { pay: {} },
    shutdown: { drainDelayMs: 0, timeoutMs: 1000 }
  }
}

async function restart (t: Test, running: Awaited<ReturnType<typeof startProcess>>): Promise<Awaited<ReturnType<typeof startProcess>>> {
  running.child.kill('SIGTERM')
  t.equal(await running.exited, 0, 'clean stop')
  return await spawnCli(t, ['start', '--config', running.configPath], running.dir, running.configPath, env)
}

t.test('overrides and forced circuits survive a restart, and are logged at start', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const first = await startProcess(t, config(up.url), env)
  const adminUrl = String(first.lines.find((l) => l.msg === 'listening')?.admin)
  t.equal((await admin(adminUrl, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'incident 7' }, TOKEN)).status, 200)
  t.equal((await admin(adminUrl, 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'provider down' }, TOKEN)).status, 200)
  const m = await admin(adminUrl, 'POST', '/v1/mitigations', { action: 'circuitBreak', upstreams: ['app'], reason: 'isolate' }, TOKEN)
  t.equal(m.status, 201)

  const second = await restart(t, first)
  t.equal((await send(second.proxy, '/checkout')).status, 503, 'the kill switch is still in force')
  t.equal((await send(second.proxy, '/pay')).status, 503, 'the forced circuit too')
  t.equal((await send(second.proxy, '/other')).status, 503, 'and the mitigation')
  const logged = second.lines.filter((l) => l.event === 'override_active')
  t.ok(logged.some((l) => l.flag === 'enableNewCheckout' && l.reason === 'incident 7'), 'every active override is logged at start')
  t.ok(logged.some((l) => l.upstream === 'pay'))
  const adminUrl2 = String(second.lines.find((l) => l.msg === 'listening')?.admin)
  const state = await admin(adminUrl2, 'GET', '/v1/state', undefined, TOKEN)
  t.equal(state.body.mitigations.length, 1)
  t.equal((await admin(adminUrl2, 'DELETE', `/v1/mitigations/${m.body.id as string}`, { reason: 'recovered' }, TOKEN)).status, 200, 'a mitigation from before the restart can be lifted')
  t.equal((await send(second.proxy, '/other')).status, 200)
})

t.test('a forced circuit survives a restart on a config without its upstream, and is in force again when a reload brings it back', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const withPay = config(up.url)
  const first = await startProcess(t, withPay, env)
  const adminUrl = String(first.lines.find((l) => l.msg === 'listening')?.admin)
  t.equal((await admin(adminUrl, 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'isolate pay' }, TOKEN)).status, 200)

  const written = parse(readFileSync(first.configPath, 'utf8')) as Record<string, unknown>
  const { pay: _pay, ...upstreams } = withPay.upstreams as Record<string, unknown>
  const routes = (withPay.routes as Array<{ upstream: string }>).filter((r) => r.upstream !== 'pay')
  writeFileSync(first.configPath, stringify({ ...written, upstreams, routes, circuitBreakers: {} }))
  const second = await restart(t, first)
  const adminUrl2 = String(second.lines.find((l) => l.msg === 'listening')?.admin)
  const absent = (await admin(adminUrl2, 'GET', '/v1/state', undefined, TOKEN)).body.circuits.pay
  t.match(absent, { forced: 'open', configured: false, forcedBy: { state: 'open', reason: 'isolate pay' } }, 'kept, and shown, while the upstream is missing')
  t.ok(second.lines.some((l) => l.event === 'override_kept' && l.upstream === 'pay'), 'and logged at start')

  writeFileSync(first.configPath, stringify(written))
  t.equal((await admin(adminUrl2, 'POST', '/v1/reload', { reason: 'pay is back' }, TOKEN)).status, 200)
  const back = (await admin(adminUrl2, 'GET', '/v1/state', undefined, TOKEN)).body.circuits.pay
  t.match(back, { state: 'open', forced: 'open', configured: true }, 'forced again once the upstream is back')
  const before = up.received.length
  t.equal((await send(second.proxy, '/pay')).status, 503, 'the operator\'s decision holds')
  t.equal(up.received.length, before, 'nothing reached the upstream')
})

/** A fresh, empty `state` directory in a temp dir of the test's. */
function stateDirIn (t: Test): string {
  const stateDir = join(tempDir(t), 'state')
  mkdirSync(stateDir)
  return stateDir
}

t.test('a corrupt state file is moved aside and the sidecar starts clean', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const stateDir = stateDirIn(t)
  writeFileSync(join(stateDir, 'state.json'), '{"version": 1, "overrides": {"enableNewCheck')
  const running = await startProcess(t, { ...config(up.url), stateDir }, env)
  t.equal((await send(running.proxy, '/checkout')).status, 200, 'serving, with no override')
  const line = running.lines.find((l) => l.event === 'state_corrupt')
  t.equal(line?.level, 'error')
  t.ok(readdirSync(stateDir).some((f) => f.startsWith('state.json.corrupt-')), 'the bad file is kept for a post-mortem')
})

t.test('a state file that cannot be read is kept aside, never replaced by the clean state; a FIFO does not hang the start', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  for (const kind of ['directory', 'fifo'] as const) {
    await t.test(kind, async (t) => {
      const stateDir = stateDirIn(t)
      const statePath = join(stateDir, 'state.json')
      // What the sidecar cannot read now may still hold kill switches in force (EACCES after a change of user, EIO).
      if (kind === 'directory') {
        mkdirSync(statePath)
        writeFileSync(join(statePath, 'kept'), 'what was there')
      } else {
        execFileSync('mkfifo', [statePath])
      }
      const running = await startProcess(t, { ...config(up.url), stateDir }, env)
      t.equal((await send(running.proxy, '/checkout')).status, 200, 'serving')
      const line = await running.waitForLine((l) => l.event === 'state_unreadable')
      t.equal(line.level, 'error')
      t.match(line.movedAside, /state\.json\.unreadable-/, 'kept aside, and the line says where')
      const aside = readdirSync(stateDir).find((f) => f.startsWith('state.json.unreadable-'))
      t.ok(aside !== undefined, 'the unreadable file is kept for a post-mortem')
      if (kind === 'directory') t.equal(readFileSync(join(stateDir, aside as string, 'kept'), 'utf8'), 'what was there', 'with what it held')
      const adminUrl = String(running.lines.find((l) => l.msg === 'listening')?.admin)
      t.equal((await admin(adminUrl, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'test' }, TOKEN)).status, 200)
      t.equal(JSON.parse(readFileSync(statePath, 'utf8')).overrides.enableNewCheckout.enabled, false, 'and state is written again')
    })
  }
})

t.test('a state file of the wrong shape is moved aside like a corrupt one, never a crash', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const foreign = [
    '{"version": 1, "overrides": null}',
    '{"version": 1, "mitigations": "none"}',
    '{"version": 1, "incidents": {}}',
    '{"version": 1, "overrides": {"enableNewCheckout": {"enabled": "no"}}}'
  ]
  for (const text of foreign) {
    await t.test(text, async (t) => {
      const stateDir = stateDirIn(t)
      writeFileSync(join(stateDir, 'state.json'), text)
      const running = await startProcess(t, { ...config(up.url), stateDir }, env)
      t.equal((await send(running.proxy, '/checkout')).status, 200, 'serving, with no override')
      const line = await running.waitForLine((l) => l.event === 'state_corrupt')
      t.match(line.error, /not a Breakwater state file/)
      t.ok(readdirSync(stateDir).some((f) => f.startsWith('state.json.corrupt-')), 'the foreign file is kept for a post-mortem')
      const adminUrl = String(running.lines.find((l) => l.msg === 'listening')?.admin)
      t.equal((await admin(adminUrl, 'GET', '/v1/state', undefined, TOKEN)).status, 200, 'the control plane answers')
      running.child.kill('SIGTERM')
      t.equal(await running.exited, 0, 'a clean stop: the sidecar never crashed on the file')
    })
  }
})

t.test('a state file a newer Breakwater wrote (the binary rolled back after an upgrade): its kill switches and forced circuits stay in force, the whole file is copied aside', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const stateDir = stateDirIn(t)
  const at = new Date().toISOString()
  const newer = {
    version: 2,
    overrides: { enableNewCheckout: { enabled: false, reason: 'checkout 500s', source: 'operator', at, expiresAt: null, scope: 'zone-a' } },
    circuits: { pay: { state: 'open', reason: 'provider down', source: 'operator', at, expiresAt: null } },
    mitigations: [
      { id: 'm-scale', action: 'scale', targets: ['app'], reason: 'more replicas', source: 'operator', createdAt: at, status: 'active', liftedAt: null, liftReason: null, changes: [], result: null },
      { id: 'm-kill', action: 'killSwitch', targets: ['enableNewCheckout'], reason: 'checkout 500s', source: 'operator', createdAt: at, status: 'active', liftedAt: null, liftReason: null, changes: [{ kind: 'flag', target: 'enableNewCheckout', before: null }], result: null }
    ],
    replicas: { app: 5 }
  }
  writeFileSync(join(stateDir, 'state.json'), JSON.stringify(newer))
  const running = await startProcess(t, { ...config(up.url), stateDir }, env)
  t.equal((await send(running.proxy, '/checkout')).status, 503, 'the kill switch is still in force')
  t.equal((await send(running.proxy, '/pay')).status, 503, 'the forced circuit too')
  const line = await running.waitForLine((l) => l.event === 'state_newer')
  t.match(line, { level: 'warn', format: 2, readable: 1, mitigationsLeftOut: 1 }, 'a warning says which format it is')
  t.match(line.msg, /newer Breakwater \(state format 2\)/)
  t.notOk(running.lines.some((l) => l.event === 'state_corrupt'), 'never called corrupt')
  const copy = readdirSync(stateDir).find((f) => f.startsWith('state.json.v2-'))
  t.equal(copy, String(line.copiedTo).split('/').pop(), 'the line says where the copy is')
  t.same(JSON.parse(readFileSync(join(stateDir, copy as string), 'utf8')), newer, 'the copy is the whole file as the newer version wrote it')
  const adminUrl = String(running.lines.find((l) => l.msg === 'listening')?.admin)
  const state = (await admin(adminUrl, 'GET', '/v1/state', undefined, TOKEN)).body
  t.same(state.mitigations.map((m: { id: string }) => m.id), ['m-kill'], 'a mitigation of an action this version does not know is left out')
  t.equal((await admin(adminUrl, 'DELETE', '/v1/mitigations/m-kill', { reason: 'recovered' }, TOKEN)).status, 200, 'the known one can be lifted')
  t.equal((await send(running.proxy, '/checkout')).status, 200)
  t.equal(JSON.parse(readFileSync(join(stateDir, 'state.json'), 'utf8')).version, 1, 'written back in the format this version reads')
})

t.test('a state file a newer Breakwater wrote is copied aside once, not once more at every start until this version can write it', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const flags = Array.from({ length: 100 }, (_, i) => `feature${i}`)
  const { dir, configPath } = writeProcessConfig(t, { ...config(up.url), featureFlags: { enableNewCheckout: true, ...Object.fromEntries(flags.map((f) => [f, true])) } })
  const stateDir = join(dir, 'state')
  mkdirSync(stateDir, { recursive: true })
  // Written compact, about 12 KiB: its copy fits under the 16 KiB file size limit below (as a
  // small file still fits on a nearly full disk), while this version's state file, indented,
  // does not, so no start writes it and every start reads the newer file again.
  const at = new Date().toISOString()
  const newer = { version: 2, overrides: Object.fromEntries(flags.map((f) => [f, { enabled: false, reason: 'checkout 500s', source: 'operator', at, expiresAt: null }])) }
  writeFileSync(join(stateDir, 'state.json'), JSON.stringify(newer))
  const copies = (): string[] => readdirSync(stateDir).filter((f) => f.startsWith('state.json.v2-'))
  const copiedTo: unknown[] = []
  for (const start of [1, 2, 3]) {
    const running = await spawnCli(t, ['start', '--config', configPath], dir, configPath, env, ['sh', '-c', 'ulimit -f 32 && exec "$@"', 'sh'])
    copiedTo.push((await running.waitForLine((l) => l.event === 'state_newer')).copiedTo)
    t.ok(running.lines.some((l) => l.event === 'state_not_persisted'), `start ${start} cannot write the state file`)
    running.child.kill('SIGTERM')
    t.equal(await running.exited, 0, 'clean stop')
  }
  t.equal(JSON.parse(readFileSync(join(stateDir, 'state.json'), 'utf8')).version, 2, 'the newer file is read at every start')
  t.equal(copies().length, 1, 'one copy, however many starts: none eats the space left')
  t.same(copiedTo, [copiedTo[0], copiedTo[0], copiedTo[0]], 'every start names that copy')
  t.same(JSON.parse(readFileSync(String(copiedTo[0]), 'utf8')), newer, 'the whole file')
})

t.test('a state file a newer Breakwater wrote in a shape this one cannot read is moved aside, and the error says so', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const stateDir = stateDirIn(t)
  writeFileSync(join(stateDir, 'state.json'), JSON.stringify({ version: 3, overrides: [{ flag: 'enableNewCheckout', enabled: false }] }))
  const running = await startProcess(t, { ...config(up.url), stateDir }, env)
  const line = await running.waitForLine((l) => l.event === 'state_corrupt')
  t.match(line.error, /written by a newer Breakwater \(state format 3; this one reads format 1\).*overrides must be an object/)
  t.notMatch(line.error, /not a Breakwater state file/)
  t.ok(readdirSync(stateDir).some((f) => f.startsWith('state.json.corrupt-')), 'kept for the newer version or a post-mortem')
  t.equal((await send(running.proxy, '/checkout')).status, 200, 'serving')
})

t.test('an audit line cut short by a crash costs only itself: the next entry starts on its own line', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const stateDir = stateDirIn(t)
  const whole = JSON.stringify({ time: '2026-01-01T00:00:00.000Z', action: 'flag.set', targets: ['a'], reason: 'before', result: 'ok', requester: 'x' })
  writeFileSync(join(stateDir, 'audit.jsonl'), `${whole}\n{"time":"2026-01-01T00:00:01.000Z","action":"flag.se`)
  const running = await startProcess(t, { ...config(up.url), stateDir }, env)
  const adminUrl = String(running.lines.find((l) => l.msg === 'listening')?.admin)
  t.equal((await admin(adminUrl, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'after the crash' }, TOKEN)).status, 200)
  const audit = await admin(adminUrl, 'GET', '/v1/audit', undefined, TOKEN)
  const reasons = (audit.body.entries as Array<{ reason: string }>).map((e) => e.reason)
  t.same(reasons, ['after the crash', 'before'], 'the new entry is readable; only the cut one is lost')
})

/** kill -9 rounds: as many as state was seen to survive under attack, kept holding. */
const KILL_ROUNDS = 9

t.test('atomic writes: kill -9 in the middle of a write storm never leaves a torn state file', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = tempDir(t)
  const stateDir = join(dir, 'state')
  for (let round = 0; round < KILL_ROUNDS; round++) {
    const running = await startProcess(t, { ...config(up.url), stateDir }, env)
    const adminUrl = String(running.lines.find((l) => l.msg === 'listening')?.admin)
    let stop = false
    const storm = (async () => {
      for (let i = 0; !stop; i++) {
        await admin(adminUrl, 'PUT', '/v1/flags/enableNewCheckout', { enabled: i % 2 === 0, reason: `write ${round}.${i} ${'x'.repeat(200)}` }, TOKEN).catch(() => {})
      }
    })()
    await new Promise((resolve) => setTimeout(resolve, 150 + Math.random() * 250))
    running.child.kill('SIGKILL')
    await running.exited
    stop = true
    await storm
    const text = readFileSync(join(stateDir, 'state.json'), 'utf8')
    let parsed: any = null
    t.doesNotThrow(() => { parsed = JSON.parse(text) }, `round ${round}: state.json parses`)
    t.equal(parsed?.version, 1)
  }
  const last = await startProcess(t, { ...config(up.url), stateDir }, env)
  t.notOk(last.lines.some((l) => l.event === 'state_corrupt'), 'the last restart found a good file')
  t.notOk(readdirSync(stateDir).some((f) => f.startsWith('state.json.corrupt-')))
})

t.test('an unwritable stateDir: actions apply in memory and answer persisted: false', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = tempDir(t)
  writeFileSync(join(dir, 'not-a-dir'), 'x')
  const running = await startProcess(t, { ...config(up.url), stateDir: join(dir, 'not-a-dir', 'state') }, env)
  t.equal((await send(running.proxy, '/checkout')).status, 200, 'the data plane never needs stateDir')
  const adminUrl = String(running.lines.find((l) => l.msg === 'listening')?.admin)
  const put = await admin(adminUrl, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'x' }, TOKEN)
  t.equal(put.status, 200)
  t.equal(put.body.persisted, false)
  t.equal((await send(running.proxy, '/checkout')).status, 503, 'applied anyway')
  t.ok(running.lines.some((l) => l.event === 'state_not_persisted' && l.level === 'warn'))
  t.ok(running.lines.some((l) => l.event === 'state_lock' && l.error === 'ENOTDIR'), 'the lock warning names why stateDir is unwritable')
})

t.test('a state file write that fails half-way (the file size limit: EFBIG, as ENOSPC on a full disk) leaves no temp file and keeps the old state file', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const flags = Array.from({ length: 12 }, (_, i) => `feature${i}`)
  const { dir, configPath } = writeProcessConfig(t, { ...config(up.url), featureFlags: { enableNewCheckout: true, ...Object.fromEntries(flags.map((f) => [f, true])) } })
  // A real write error after the temp file exists: the kernel refuses to grow any file past
  // 16 KiB (dash counts `ulimit -f` in 512-byte blocks), so the state file fills its limit
  // while the audit log, one line per call, does not.
  const running = await spawnCli(t, ['start', '--config', configPath], dir, configPath, env, ['sh', '-c', 'ulimit -f 32 && exec "$@"', 'sh'])
  const adminUrl = String(running.lines.find((l) => l.msg === 'listening')?.admin)
  const stateDir = join(dir, 'state')
  let failedAt = -1
  for (const [i, flag] of flags.entries()) {
    const put = await admin(adminUrl, 'PUT', `/v1/flags/${flag}`, { enabled: false, reason: `${flag} ${'x'.repeat(990)}` }, TOKEN)
    t.equal(put.status, 200, 'applied in memory whatever the disk says')
    if (put.body.persisted === false) { failedAt = i; break }
  }
  t.ok(failedAt > 0, 'the state file grew until a write of it failed')
  const line = await running.waitForLine((l) => l.event === 'state_not_persisted')
  t.match(line, { level: 'warn', code: 'EFBIG', path: join(stateDir, 'state.json') }, 'the warning names the cause and the file')
  t.match(line.msg, /keeps the last state written/)
  t.equal((await send(running.proxy, '/checkout')).status, 200, 'the data plane never needs stateDir')
  // The incidents those kills opened write in the background too: a clean stop waits for them.
  running.child.kill('SIGTERM')
  t.equal(await running.exited, 0, 'a clean stop')
  t.same(readdirSync(stateDir).filter((f) => f.includes('.tmp-')), [], 'no temp file left behind to eat the space left')
  const kept = JSON.parse(readFileSync(join(stateDir, 'state.json'), 'utf8'))
  t.same(Object.keys(kept.overrides).sort(), flags.slice(0, failedAt).sort(), 'the old state file is intact: every override written before the failure')
})

t.test('a generated admin token that cannot be written (no room for one byte) leaves no temp file holding it, and the old token file as it was', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { dir, configPath } = writeProcessConfig(t, config(up.url))
  // The token an earlier run generated: a failed write must leave it whole, not empty or torn.
  const oldToken = 'token-of-the-earlier-run-0123456789abcdef'
  mkdirSync(join(dir, 'state'), { recursive: true })
  writeFileSync(join(dir, 'state', 'admin.token'), oldToken + '\n', { mode: 0o600 })
  const running = await spawnCli(t, ['start', '--config', configPath], dir, configPath, { BREAKWATER_ADMIN_TOKEN: undefined }, ['sh', '-c', 'ulimit -f 0 && exec "$@"', 'sh'])
  const line = await running.waitForLine((l) => l.event === 'admin_token')
  t.equal(line.level, 'warn', 'the token could not be written, and the line says so')
  t.equal((await send(running.proxy, '/checkout')).status, 200, 'serving')
  t.same(readdirSync(join(dir, 'state')).filter((f) => f.includes('.tmp-')), [], 'no temp file left, none with a token or part of one')
  t.equal(readFileSync(join(dir, 'state', 'admin.token'), 'utf8'), oldToken + '\n', 'the old token file is intact')
})
