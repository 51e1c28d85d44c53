/**
 * Where the admin API's bearer token comes from (SPEC §6): BREAKWATER_ADMIN_TOKEN, else
 * admin.tokenFile, else one generated at start into STATEDIR/admin.token (mode 0600) whose
 * path — never the token — is logged. An admin listener off loopback needs an explicit token.
 * Every case runs the real binary.
 */
import t, { type Test } from 'tap'
import { chmodSync, closeSync, existsSync, mkdirSync, openSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { stringify } from 'yaml'
import { startUpstream, type TestUpstream } from './helpers/upstream.js'
import { runCli, tempDir, type CliResult, type Running } from './helpers/process.js'
import { admin } from './helpers/admin.js'
import { eventually } from './helpers/http.js'
import pino from 'pino'
import { TokenFileWatcher, resolveAdminToken, writeAdminToken } from '../src/control/token.js'
import { adminUrl, operator, startSidecarProcess, STACK_FRAME } from './helpers/operator.js'

// Each case starts a fresh Node process; leave room for a busy machine.
t.setTimeout(600_000)

const LOOPBACK_LISTEN = {
  proxy: { host: '127.0.0.1', port: 0 },
  ops: { host: '127.0.0.1', port: 0 },
  admin: { host: '127.0.0.1', port: 0 }
}

function config (up: TestUpstream, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'enableNewCheckout' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { enableNewCheckout: true },
    shutdown: { drainDelayMs: 0, timeoutMs: 2000 },
    ...extra
  }
}

async function upstream (t: Test): Promise<TestUpstream> {
  const up = await startUpstream()
  t.teardown(up.close)
  return up
}

/** Stop the process with SIGTERM so its shutdown lines are written too, and return every line. */
async function allOutput (s: Running): Promise<string> {
  s.child.kill('SIGTERM')
  await s.exited
  return s.lines.map((l) => JSON.stringify(l)).join('\n') + '\n' + s.stderr()
}

/** Make the sidecar log what it logs for admin actions, so the scan below covers them. */
async function exercise (url: string, token: string): Promise<void> {
  await admin(url, 'PUT', '/v1/flags/enableNewCheckout', { enabled: false, reason: 'token test' }, token)
  await admin(url, 'DELETE', '/v1/flags/enableNewCheckout', { reason: 'token test' }, token)
  await admin(url, 'GET', '/v1/state', undefined, 'wrong-token-wrong-token')
}

t.test('with no token configured, one is generated into STATEDIR/admin.token (0600); its path is logged, never the token', async (t) => {
  const up = await upstream(t)
  const stateDir = join(tempDir(t), 'state')
  const s = await startSidecarProcess(t, config(up, { stateDir }), { BREAKWATER_ADMIN_TOKEN: undefined })
  const url = adminUrl(s)
  const tokenPath = join(stateDir, 'admin.token')

  t.ok(existsSync(tokenPath), 'the token file exists')
  t.equal(statSync(tokenPath).mode & 0o777, 0o600, 'readable by its owner only')
  const token = readFileSync(tokenPath, 'utf8').trim()
  t.ok(token.length >= 32, 'a long random token')
  t.notOk(/\s/.test(token), 'one word')

  const logged = s.lines.find((l) => l.event === 'admin_token')
  t.ok(logged, 'an admin_token line is logged')
  t.equal(logged?.path, tokenPath, 'naming the file')

  const ok = await admin(url, 'GET', '/v1/state', undefined, token)
  t.equal(ok.status, 200, 'the generated token works')
  const wrong = await admin(url, 'GET', '/v1/state', undefined, `${token.slice(0, -1)}${token.endsWith('0') ? '1' : '0'}`)
  t.equal(wrong.status, 401, 'a wrong one is refused')
  t.equal(wrong.body.error, 'unauthorized')
  t.equal((await admin(url, 'GET', '/v1/state', undefined, null)).status, 401, 'and so is none')

  await exercise(url, token)
  const output = await allOutput(s)
  t.ok(s.lines.length >= 4, 'the scan covers start-up, admin actions and shutdown')
  t.notOk(output.includes(token), 'the token appears in no log line and not on stderr')
})

t.test('a generated token replaces a world-readable leftover file and is written 0600', async (t) => {
  const up = await upstream(t)
  const stateDir = join(tempDir(t), 'state')
  mkdirSync(stateDir, { recursive: true })
  const tokenPath = join(stateDir, 'admin.token')
  writeFileSync(tokenPath, 'leftover-token-from-elsewhere-0123456789\n', { mode: 0o644 })
  const s = await startSidecarProcess(t, config(up, { stateDir }), { BREAKWATER_ADMIN_TOKEN: undefined })
  t.equal(statSync(tokenPath).mode & 0o777, 0o600)
  const token = readFileSync(tokenPath, 'utf8').trim()
  t.equal((await admin(adminUrl(s), 'GET', '/v1/state', undefined, token)).status, 200, 'the file holds the token in force')
})

t.test('a generated token is never in a file others can read: a world-readable temp file left by an earlier process is not written into', async (t) => {
  const stateDir = join(tempDir(t), 'state')
  mkdirSync(stateDir, { recursive: true })
  // A process killed mid-write leaves its temp file; in a container the next start has the
  // same pid, so the same temp names. Whoever opened such a leftover (it was 0644) keeps
  // reading it after any chmod: the token must go to a fresh 0600 file instead.
  const leftovers = [`admin.token.tmp-${process.pid}`, ...[0, 1, 2, 3].map((n) => `admin.token.tmp-${process.pid}-${n}`)].map((name) => {
    const path = join(stateDir, name)
    writeFileSync(path, '')
    chmodSync(path, 0o644)
    return openSync(path, 'r')
  })
  t.teardown(() => { for (const fd of leftovers) closeSync(fd) })
  const generated = await resolveAdminToken(undefined, null, stateDir)
  const written = await writeAdminToken(generated)
  t.equal(written.written, true, 'written')
  const tokenPath = join(stateDir, 'admin.token')
  t.equal(readFileSync(tokenPath, 'utf8').trim(), generated.token, 'the file holds the token')
  t.equal(statSync(tokenPath).mode & 0o777, 0o600, 'readable by its owner only')
  for (const fd of leftovers) t.notOk(readFileSync(fd, 'utf8').includes(generated.token), 'a reader of a leftover temp file never sees the token')
})

t.test('BREAKWATER_ADMIN_TOKEN is used when set, and no token file is written', async (t) => {
  const up = await upstream(t)
  const stateDir = join(tempDir(t), 'state')
  const token = 'env-token-for-the-admin-api-0123456789'
  const s = await startSidecarProcess(t, config(up, { stateDir }), { BREAKWATER_ADMIN_TOKEN: token })
  const url = adminUrl(s)
  t.equal((await admin(url, 'GET', '/v1/state', undefined, token)).status, 200, 'the environment token works')
  t.equal((await admin(url, 'GET', '/v1/state', undefined, 'wrong-token-wrong-token')).status, 401)
  t.equal((await admin(url, 'GET', '/v1/state', undefined, null)).status, 401)
  t.notOk(existsSync(join(stateDir, 'admin.token')), 'no token file is generated')
  t.notOk(s.lines.some((l) => l.event === 'admin_token'), 'and none is announced')
  await exercise(url, token)
  t.notOk((await allOutput(s)).includes(token), 'the token is never logged')
})

t.test('admin.tokenFile is used when set', async (t) => {
  const up = await upstream(t)
  const dir = tempDir(t)
  const stateDir = join(dir, 'state')
  const tokenFile = join(dir, 'admin-token.txt')
  const token = 'file-token-for-the-admin-api-0123456789'
  writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 })
  const s = await startSidecarProcess(t, config(up, { stateDir, admin: { tokenFile } }), { BREAKWATER_ADMIN_TOKEN: undefined })
  const url = adminUrl(s)
  t.equal((await admin(url, 'GET', '/v1/state', undefined, token)).status, 200, 'the token from the file works')
  t.equal((await admin(url, 'GET', '/v1/state', undefined, 'wrong-token-wrong-token')).status, 401)
  t.notOk(existsSync(join(stateDir, 'admin.token')), 'no token is generated')

  // The CLI finds the same file through the config's admin.tokenFile.
  const run = operator(t)
  const status = await run(['status', '--json', '--config', s.configPath, '--admin', url])
  t.equal(status.code, 0, status.stderr)
  t.equal(JSON.parse(status.stdout).flags.enableNewCheckout.enabled, true)

  await exercise(url, token)
  t.notOk((await allOutput(s)).includes(token), 'the token is never logged')
})

t.test('a rotated admin.tokenFile is the token: the old one is refused, the new one works, for the CLI too', async (t) => {
  const up = await upstream(t)
  const dir = tempDir(t)
  const tokenFile = join(dir, 'admin-token.txt')
  const old = 'first-token-for-the-admin-api-0123456789'
  const next = 'second-token-for-the-admin-api-9876543210'
  writeFileSync(tokenFile, `${old}\n`, { mode: 0o600 })
  const s = await startSidecarProcess(t, config(up, { stateDir: join(dir, 'state'), admin: { tokenFile } }), { BREAKWATER_ADMIN_TOKEN: undefined })
  const url = adminUrl(s)
  t.equal((await admin(url, 'GET', '/v1/state', undefined, old)).status, 200, 'the first token works')

  // A Secret volume is updated by swapping in a new file, never by writing into the old one.
  writeFileSync(`${tokenFile}.new`, `${next}\n`, { mode: 0o600 })
  renameSync(`${tokenFile}.new`, tokenFile)
  t.ok(await eventually(async () => (await admin(url, 'GET', '/v1/state', undefined, next)).status === 200, 60_000, 100), 'the new token works')
  t.equal((await admin(url, 'GET', '/v1/state', undefined, old)).status, 401, 'the old one is refused')
  const run = operator(t)
  const status = await run(['status', '--json', '--config', s.configPath, '--admin', url])
  t.equal(status.code, 0, `the CLI, which reads the file, gets in: ${status.stderr}`)

  // A rotation half done (an empty file) is not a token: the running one stays.
  writeFileSync(`${tokenFile}.new`, '', { mode: 0o600 })
  renameSync(`${tokenFile}.new`, tokenFile)
  t.ok(await eventually(() => s.lines.some((l) => l.event === 'admin_token' && l.result === 'refused'), 60_000, 100), 'the empty file is refused, with an error line')
  t.equal((await admin(url, 'GET', '/v1/state', undefined, next)).status, 200, 'and the token in force still works')
  t.equal((await admin(url, 'GET', '/v1/state', undefined, '')).status, 401, 'an empty one does not')
  t.notOk((await allOutput(s)).includes(next), 'the token is never logged')
})

t.test('a token file rewritten in place is applied whole: a check that catches it half written waits for the next', async (t) => {
  const dir = tempDir(t)
  const tokenFile = join(dir, 'admin-token.txt')
  const old = 'first-token-for-the-admin-api-0123456789'
  const next = 'second-token-for-the-admin-api-9876543210-and-more'
  writeFileSync(tokenFile, `${old}\n`, { mode: 0o600 })
  const lines: Array<Record<string, unknown>> = []
  const logger = pino({ level: 'info' }, { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } })
  const applied: string[] = []
  // The checks, driven by hand: no timer decides when this test looks.
  const watcher = new TokenFileWatcher(tokenFile, (token) => { applied.push(token) }, logger, 3_600_000)
  await watcher.start(old)
  t.teardown(() => { watcher.stop() })
  const poll = async (): Promise<void> => { await (watcher as unknown as { poll: () => Promise<void> }).poll() }

  // `printf … > file` in two writes: truncated, then half the token, then the rest.
  writeFileSync(tokenFile, '')
  await poll()
  writeFileSync(tokenFile, next.slice(0, 24))
  await poll()
  t.same(applied, [], 'neither the empty file nor half the token is applied while the file changes')
  t.notOk(lines.some((l) => l.event === 'admin_token' && l.result === 'refused'), 'and the empty file between the writes is no error line')
  writeFileSync(tokenFile, `${next}\n`)
  await poll()
  t.same(applied, [], 'a check that sees the file changed does not apply it yet')
  await poll()
  t.same(applied, [next], 'the whole token, seen twice the same, is applied')
  t.ok(lines.some((l) => l.event === 'admin_token' && l.result === 'reloaded'), 'and logged')

  // A file that stays unusable is still refused, once.
  writeFileSync(tokenFile, 'short')
  await poll()
  await poll()
  await poll()
  t.equal(lines.filter((l) => l.event === 'admin_token' && l.result === 'refused').length, 1, 'a short token that stays is refused with one error line')
  t.same(applied, [next], 'and the running token is kept')
})

t.test('a token file that is too short or missing is a start-up error naming admin.tokenFile', async (t) => {
  const up = await upstream(t)
  const dir = tempDir(t)
  const start = async (tokenFile: string): Promise<CliResult> => {
    const configPath = join(dir, 'breakwater.yaml')
    writeFileSync(configPath, stringify({ service: 'tok', version: '1.0.0', stateDir: join(dir, 'state'), listen: LOOPBACK_LISTEN, ...config(up, { admin: { tokenFile } }) }))
    return await runCli(['start', '--config', configPath], { cwd: dir, env: { BREAKWATER_ADMIN_TOKEN: undefined, BREAKWATER_CONFIG: undefined }, timeoutMs: 60_000 })
  }
  const shortFile = join(dir, 'short.txt')
  writeFileSync(shortFile, 'short\n', { mode: 0o600 })
  const short = await start(shortFile)
  t.equal(short.code, 1, short.stderr)
  t.match(short.stderr, /admin\.tokenFile/)
  t.notMatch(short.stderr, STACK_FRAME)
  t.notMatch(short.stdout, /"listening"/)

  const missingFile = join(dir, 'missing.txt')
  const missing = await start(missingFile)
  t.equal(missing.code, 1, missing.stderr)
  t.match(missing.stderr, missingFile, 'the message names the file')
  t.match(missing.stderr, /admin\.tokenFile/, 'and the config key that points at it')
  t.notMatch(missing.stderr, STACK_FRAME)
  t.notMatch(missing.stdout, /"listening"/)
})

t.test('an admin listener off loopback needs an explicit token', async (t) => {
  const up = await upstream(t)
  const dir = tempDir(t)
  const exposed = { ...LOOPBACK_LISTEN, admin: { host: '0.0.0.0', port: 0 } }
  const configPath = join(dir, 'breakwater.yaml')
  writeFileSync(configPath, stringify({ service: 'tok', version: '1.0.0', stateDir: join(dir, 'state'), listen: exposed, ...config(up) }))

  const refused = await runCli(['start', '--config', configPath], { cwd: dir, env: { BREAKWATER_ADMIN_TOKEN: undefined, BREAKWATER_CONFIG: undefined }, timeoutMs: 60_000 })
  t.equal(refused.code, 1, 'refused at start')
  t.match(refused.stderr, /listen\.admin/, 'the message names listen.admin')
  t.match(refused.stderr, /BREAKWATER_ADMIN_TOKEN|admin\.tokenFile/, 'and says how to fix it')
  t.notMatch(refused.stderr, STACK_FRAME)
  const lines = refused.stdout.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Record<string, unknown>)
  t.notOk(lines.some((l) => l.msg === 'listening'), 'it never listened')
  const fatal = lines.find((l) => l.event === 'startup_failed')
  t.ok(fatal, 'a startup_failed line on stdout')
  t.match(JSON.stringify(fatal?.problems), /listen\.admin/)
  t.notOk(existsSync(join(dir, 'state', 'admin.token')), 'no token was generated for it')

  // With a token from the environment it starts; requests still go to 127.0.0.1 only.
  const token = 'env-token-for-an-exposed-admin-api-0123'
  const withEnv = await startSidecarProcess(t, config(up, { listen: exposed }), { BREAKWATER_ADMIN_TOKEN: token })
  const url = `http://127.0.0.1:${new URL(adminUrl(withEnv)).port}`
  t.equal((await admin(url, 'GET', '/v1/state', undefined, token)).status, 200, 'the admin API answers with the token')
  t.equal((await admin(url, 'GET', '/v1/state', undefined, null)).status, 401, 'and refuses without it')

  // So does admin.tokenFile.
  const tokenFile = join(dir, 'token.txt')
  writeFileSync(tokenFile, 'file-token-for-an-exposed-admin-api-0123\n', { mode: 0o600 })
  const withFile = await startSidecarProcess(t, config(up, { listen: exposed, admin: { tokenFile } }), { BREAKWATER_ADMIN_TOKEN: undefined })
  const fileUrl = `http://127.0.0.1:${new URL(adminUrl(withFile)).port}`
  t.equal((await admin(fileUrl, 'GET', '/v1/state', undefined, 'file-token-for-an-exposed-admin-api-0123')).status, 200)
})
