import t from 'tap'
import { ROOT } from './helpers/root.js'
import net from 'node:net'
import { readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import type { AddressInfo } from 'node:net'
import type { Test } from 'tap'
import { stringify } from 'yaml'
import { runCli, tempDir, type CliResult } from './helpers/process.js'

const root = ROOT
const packageVersion = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }).version

// Every test spawns short-lived processes of its own: run them side by side.
t.jobs = 2

/** No BREAKWATER_CONFIG from the surroundings unless a test sets it. */
const cleanEnv: NodeJS.ProcessEnv = { BREAKWATER_CONFIG: undefined }

function validConfig (dir: string): Record<string, unknown> {
  return {
    service: 'checkout',
    version: '1.2.3',
    stateDir: join(dir, 'state'),
    listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } },
    upstreams: { app: { url: 'http://127.0.0.1:3000' }, paymentService: { endpoints: ['http://127.0.0.1:8080', 'http://127.0.0.1:8081'] } },
    routes: [
      { match: { pathPrefix: '/payments' }, upstream: 'paymentService' },
      { match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    shutdown: { drainDelayMs: 0, timeoutMs: 1000 }
  }
}

/** Three problems: an unknown upstream in a route, an out-of-range number, an unknown key. */
function invalidConfig (dir: string): Record<string, unknown> {
  const config = validConfig(dir)
  return {
    ...config,
    routes: [{ match: { pathPrefix: '/' }, upstream: 'nowhere' }],
    circuitBreakers: { paymentService: { failureThreshold: 1.5 } },
    colour: 'blue'
  }
}

function write (dir: string, name: string, config: Record<string, unknown>): string {
  const path = join(dir, name)
  writeFileSync(path, name.endsWith('.json') ? JSON.stringify(config) : stringify(config))
  return path
}

function lines (text: string): string[] {
  return text.split('\n').filter((l) => l !== '')
}

/** Every stdout line parses as one JSON object. */
function assertJsonLines (t: Test, result: CliResult): Array<Record<string, unknown>> {
  const parsed: Array<Record<string, unknown>> = []
  for (const line of lines(result.stdout)) {
    let value: unknown
    try { value = JSON.parse(line) } catch { value = undefined }
    t.ok(value !== null && typeof value === 'object' && !Array.isArray(value), 'stdout line is a JSON object', { line })
    if (value !== undefined) parsed.push(value as Record<string, unknown>)
  }
  return parsed
}

function noStackTrace (t: Test, text: string): void {
  t.notMatch(text, /\n\s+at .+[(:]\d+/, 'no stack trace', { text })
}

t.test('--help and --version', async (t) => {
  const [help, version] = await Promise.all([runCli(['--help'], { env: cleanEnv }), runCli(['--version'], { env: cleanEnv })])
  t.equal(help.code, 0, '--help exits 0')
  t.match(help.stdout, /\bstart\b/, 'mentions start')
  t.match(help.stdout, /\bvalidate\b/, 'mentions validate')
  t.match(help.stdout, /--config/, 'mentions --config')
  t.equal(version.code, 0, '--version exits 0')
  t.equal(version.stdout.trim(), packageVersion, '--version prints package.json\'s version')
})

t.test('validate: a valid config exits 0 with a one-line summary', async (t) => {
  const dir = tempDir(t)
  // health.failOnOpenCircuit: any is valid but earns a warning.
  const path = write(dir, 'breakwater.yaml', { ...validConfig(dir), health: { failOnOpenCircuit: 'any' } })
  const result = await runCli(['validate', '--config', path], { env: cleanEnv })
  t.equal(result.code, 0, 'exit 0: a warning does not make a config invalid', { stderr: result.stderr })
  t.equal(lines(result.stdout).length, 1, 'one line on stdout', { stdout: result.stdout })
  t.match(result.stdout, /valid/)
  t.match(result.stdout, /checkout/, 'names the service')
  t.same(lines(result.stderr).map((l) => l.slice(0, 34)), ['warning: health.failOnOpenCircuit:'], 'only the warning, on stderr')
})

t.test('validate: an admin listener start would refuse without a token is a warning, and not with one', async (t) => {
  const dir = tempDir(t)
  const config = validConfig(dir) as { listen: Record<string, unknown> }
  const path = write(dir, 'breakwater.yaml', { ...config, listen: { ...config.listen, admin: { host: '0.0.0.0', port: 0 } } })
  const bare = await runCli(['validate', '--config', path], { env: cleanEnv })
  t.equal(bare.code, 0, 'valid: the token may come from where it will run', { stderr: bare.stderr })
  t.match(bare.stderr, /^warning: listen\.admin: 0\.0\.0\.0 is not a loopback address; start refuses it unless BREAKWATER_ADMIN_TOKEN/m)
  const withToken = await runCli(['validate', '--config', path], { env: { ...cleanEnv, BREAKWATER_ADMIN_TOKEN: 'a-long-enough-token-for-tests' } })
  t.equal(withToken.code, 0)
  t.notMatch(withToken.stderr, /listen\.admin/, 'no warning with a token')
})

t.test('validate: an admin.tokenFile start could not use is a warning: missing, or a token under 16 characters', async (t) => {
  const dir = tempDir(t)
  writeFileSync(join(dir, 'short.token'), 'short\n')
  writeFileSync(join(dir, 'good.token'), 'a-long-enough-token-for-tests\n')
  for (const [file, why] of [['missing.token', /^warning: admin\.tokenFile: cannot read \S+missing\.token: ENOENT; start refuses it unless BREAKWATER_ADMIN_TOKEN is set$/m], ['short.token', /^warning: admin\.tokenFile: \S+short\.token holds a token shorter than 16 characters; start refuses it/m]] as const) {
    const path = write(dir, 'breakwater.yaml', { ...validConfig(dir), admin: { tokenFile: `./${file}` } })
    const r = await runCli(['validate', '--config', path], { env: cleanEnv })
    t.equal(r.code, 0, `${file}: valid, the secret may be mounted where it runs`, { stderr: r.stderr })
    t.match(r.stderr, why, `${file}: said`)
  }
  const path = write(dir, 'breakwater.yaml', { ...validConfig(dir), admin: { tokenFile: './good.token' } })
  const good = await runCli(['validate', '--config', path], { env: cleanEnv })
  t.notMatch(good.stderr, /tokenFile/, 'a good token file: nothing to say')
})

t.test('validate: a Slack channel without the webhook URL that sends to it is a warning', async (t) => {
  const dir = tempDir(t)
  const path = write(dir, 'breakwater.yaml', { ...validConfig(dir), notifications: { slackChannel: '#incidents-prod' } })
  const result = await runCli(['validate', '--config', path], { env: cleanEnv })
  t.equal(result.code, 0, 'valid: the URL is a secret that may be set where it runs', { stderr: result.stderr })
  t.same(lines(result.stderr), ['warning: notifications.slackWebhookUrl: not set; Slack messages to #incidents-prod are not sent'])
})

t.test('validate: an invalid config exits 1 with one line per problem, each naming its key path', async (t) => {
  const dir = tempDir(t)
  const path = write(dir, 'breakwater.yaml', invalidConfig(dir))
  const result = await runCli(['validate', '--config', path], { env: cleanEnv })
  t.equal(result.code, 1, 'exit 1')
  t.equal(result.stdout, '', 'problems go to stderr')
  const problems = lines(result.stderr)
  t.ok(problems.some((l) => /^routes\[0\]\.upstream: unknown upstream/.test(l)), 'the route\'s unknown upstream', { problems })
  t.ok(problems.some((l) => /^circuitBreakers\.paymentService\.failureThreshold: must be <= 1/.test(l)), 'the out-of-range threshold', { problems })
  t.ok(problems.some((l) => /^colour: unknown key/.test(l)), 'the unknown key', { problems })
  for (const line of problems) t.match(line, /^[A-Za-z][\w.[\]]*: \S/, `"${line}" starts with a key path`)
  noStackTrace(t, result.stderr)

  const json = await runCli(['validate', '--config', path, '--json'], { env: cleanEnv })
  t.equal(json.code, 1, '--json: still exit 1')
  const out = lines(json.stdout)
  t.equal(out.length, 1, '--json: one line')
  const report = JSON.parse(out[0] ?? '{}') as { valid: boolean, problems: string[] }
  t.equal(report.valid, false)
  t.same(report.problems, problems, '--json lists the same problems')
})

t.test('validate --json on a valid config prints only JSON', async (t) => {
  const dir = tempDir(t)
  const path = write(dir, 'breakwater.json', { ...validConfig(dir), health: { failOnOpenCircuit: 'any' } })
  const result = await runCli(['validate', '--json', '--config', path], { env: cleanEnv })
  t.equal(result.code, 0)
  const out = lines(result.stdout)
  t.equal(out.length, 1)
  const report = JSON.parse(out[0] ?? '{}') as { valid: boolean, warnings: string[] }
  t.equal(report.valid, true)
  t.ok(report.warnings.some((w) => w.startsWith('health.failOnOpenCircuit')), 'warnings are part of the JSON', { report })
  t.equal(result.stderr, '', 'nothing but JSON is printed')
})

t.test('validate reads BREAKWATER_CONFIG when --config is not given', async (t) => {
  const dir = tempDir(t)
  const good = write(dir, 'good.yaml', validConfig(dir))
  const bad = write(dir, 'bad.yaml', invalidConfig(dir))
  const [fromEnv, override] = await Promise.all([
    runCli(['validate'], { env: { BREAKWATER_CONFIG: bad } }),
    runCli(['validate', '--config', good], { env: { BREAKWATER_CONFIG: bad } })
  ])
  t.equal(fromEnv.code, 1, 'the invalid file named by BREAKWATER_CONFIG was read')
  t.match(fromEnv.stderr, /routes\[0\]\.upstream/)
  t.equal(override.code, 0, '--config wins over BREAKWATER_CONFIG')
  t.match(override.stdout, /good\.yaml/)
})

t.test('validate without any config path checks the embedded default', async (t) => {
  const dir = tempDir(t)
  const result = await runCli(['validate'], { cwd: dir, env: cleanEnv })
  t.equal(result.code, 0, 'the embedded default is valid', { stderr: result.stderr })
  t.match(result.stdout, /breakwater\.yaml/)
})

t.test('options may come before or after positional arguments', async (t) => {
  const dir = tempDir(t)
  const bad = write(dir, 'bad.yaml', invalidConfig(dir))
  const good = write(dir, 'good.yaml', validConfig(dir))
  // `validate --config X` is the form used everywhere else in this file.
  const [before, json] = await Promise.all([
    runCli(['--config', bad, 'validate'], { env: cleanEnv }),
    runCli(['--json', 'validate', '-c', good], { env: cleanEnv })
  ])
  t.equal(before.code, 1, '--config X validate: the given file was validated')
  t.match(before.stderr, /routes\[0\]\.upstream/)
  t.equal(json.code, 0)
  t.equal((JSON.parse(json.stdout) as { valid: boolean }).valid, true, '--json before the command, -c after it')
})

t.test('start and validate refuse a file name given as a word: the config is --config PATH', async (t) => {
  const dir = tempDir(t)
  const bad = write(dir, 'bad.yaml', invalidConfig(dir))
  const good = write(dir, 'good.yaml', validConfig(dir))
  const [alone, besides, start] = await Promise.all([
    // In an empty folder without BREAKWATER_CONFIG the embedded default would be the one read.
    runCli(['validate', bad], { cwd: dir, env: cleanEnv }),
    runCli(['validate', '--config', good, bad], { cwd: dir, env: cleanEnv }),
    // Were the word ignored, start would run BREAKWATER_CONFIG's file (here an invalid one: exit 1).
    runCli(['start', good], { cwd: dir, env: { BREAKWATER_CONFIG: bad } })
  ])
  for (const [label, r, command] of [['validate bad.yaml', alone, 'validate'], ['validate --config good.yaml bad.yaml', besides, 'validate'], ['start good.yaml', start, 'start']] as const) {
    t.equal(r.code, 2, `${label}: exit 2`, { stderr: r.stderr, stdout: r.stdout })
    t.match(r.stderr, new RegExp(`${command} takes no file name \\(got "[^"]*\\.yaml"\\): give the config with --config PATH`), `${label}: says how to name the file`)
    t.equal(r.stdout, '', `${label}: nothing validated, nothing started`)
    noStackTrace(t, r.stderr)
  }
})

t.test('an unknown command or option exits non-zero with a message', async (t) => {
  const [unknown, option] = await Promise.all([
    runCli(['frobnicate'], { env: cleanEnv }),
    runCli(['validate', '--frobnicate'], { env: cleanEnv })
  ])
  t.not(unknown.code, 0)
  t.match(unknown.stderr, /unknown command/i)
  t.match(unknown.stderr, /frobnicate/)
  t.equal(unknown.stdout, '')
  noStackTrace(t, unknown.stderr)

  t.not(option.code, 0)
  t.match(option.stderr, /frobnicate/)
  noStackTrace(t, option.stderr)
})

t.test('validate: a missing file is a problem, not a crash', async (t) => {
  const dir = tempDir(t)
  const missing = await runCli(['validate', '--config', join(dir, 'nope.yaml')], { env: cleanEnv })
  t.equal(missing.code, 1)
  t.match(missing.stderr, /nope\.yaml: file not found/)
  noStackTrace(t, missing.stderr)
})

t.test('start with a bad config exits 1, names the key, and keeps stdout JSON', async (t) => {
  const dir = tempDir(t)
  const path = write(dir, 'breakwater.yaml', invalidConfig(dir))
  const result = await runCli(['start', '--config', path], { env: cleanEnv })
  t.equal(result.code, 1, 'exit 1')
  t.match(result.stderr, /routes\[0\]\.upstream: unknown upstream/)
  t.match(result.stderr, /circuitBreakers\.paymentService\.failureThreshold: must be <= 1/)
  noStackTrace(t, result.stderr)
  const logged = assertJsonLines(t, result)
  const fatal = logged.find((l) => l.level === 'fatal')
  t.ok(fatal, 'a fatal log line on stdout')
  t.ok((fatal?.problems as string[] | undefined)?.some((p) => p.startsWith('routes[0].upstream: ')), 'the log line lists the problems')
})

t.test('start on a port already in use exits 1 with a message and no stack trace', async (t) => {
  const blocker = net.createServer()
  await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { blocker.close() })
  const port = (blocker.address() as AddressInfo).port
  // One state dir each: the two start at once, and a state dir is held by one sidecar.
  const results = await Promise.all(['proxy', 'ops'].map(async (listener) => {
    const dir = tempDir(t)
    const config = validConfig(dir)
    const listen = config.listen as Record<string, { host: string, port: number }>
    listen[listener] = { host: '127.0.0.1', port }
    const path = write(dir, `${listener}.yaml`, config)
    return [listener, await runCli(['start', '--config', path], { env: cleanEnv })] as const
  }))
  for (const [listener, result] of results) {
    t.equal(result.code, 1, `${listener} port taken: exit 1`)
    t.match(result.stderr, /address already in use/, 'says why')
    t.match(result.stderr, String(port), 'names the port')
    t.match(result.stderr, `listen.${listener}`, 'and the config key')
    noStackTrace(t, result.stderr)
    assertJsonLines(t, result)
  }
})

t.test('two listeners on one port, one by the name localhost and one by 127.0.0.1: validate and start exit 1 naming the key', async (t) => {
  const dir = tempDir(t)
  const config = validConfig(dir)
  const listen = config.listen as Record<string, { host: string, port: number }>
  listen.proxy = { host: '127.0.0.1', port: 17555 }
  listen.admin = { host: 'localhost', port: 17555 }
  const path = write(dir, 'clash.yaml', config)
  for (const command of ['validate', 'start']) {
    const result = await runCli([command, '--config', path], { env: cleanEnv })
    t.equal(result.code, 1, `${command}: exit 1`)
    t.match(result.stderr, /listen\.admin\.port: 17555 is also listen\.proxy's port/, `${command}: names both keys, not "address already in use" at the one that bound first`)
    noStackTrace(t, result.stderr)
  }
})

t.test('start with a listener host that does not resolve exits 1 naming the key', async (t) => {
  const dir = tempDir(t)
  const config = validConfig(dir)
  const listen = config.listen as Record<string, { host: string, port: number }>
  listen.ops = { host: 'no-such-host.invalid', port: 0 }
  const result = await runCli(['start', '--config', write(dir, 'bad-host.yaml', config)], { env: cleanEnv })
  t.equal(result.code, 1)
  t.match(result.stderr, /listen\.ops\.host: cannot listen on "no-such-host\.invalid": the name does not resolve/, 'the key, the name and why')
  noStackTrace(t, result.stderr)
})
