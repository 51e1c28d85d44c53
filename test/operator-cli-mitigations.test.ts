/**
 * The operator commands of the real binary (SPEC §1, §13, §14) against real sidecar
 * processes in front of a real upstream: mitigate and lift, audit, token discovery, fan-out
 * to several sidecars. (status, kill, restore, circuit: operator-cli.)
 */
import t from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { parse, stringify } from 'yaml'
import { startUpstream } from './helpers/upstream.js'
import { tempDir, type CliResult } from './helpers/process.js'
import { send } from './helpers/http.js'
import { admin } from './helpers/admin.js'
import { operator, runAll, adminUrl, parseOnlyJson, startSidecarProcess, STACK_FRAME, TOKEN, FLAG, config, fixture, withToken, state, auditEntries } from './helpers/operator.js'

// Every command is a fresh Node process; leave room for a busy machine.
t.setTimeout(600_000)

t.test('mitigate killSwitch, then lift it by id', async (t) => {
  const { s, url } = await fixture(t)
  const run = operator(t)
  const mitigate = await run(['mitigate', 'killSwitch', '--reason', 'feature regression', '--admin', url], withToken)
  t.equal(mitigate.code, 0, mitigate.stderr)
  const m = /mitigation (\S+): killSwitch applied/.exec(mitigate.stdout)
  t.ok(m, `the output names the mitigation: ${mitigate.stdout}`)
  const id = m?.[1] ?? ''
  t.match(mitigate.stdout, FLAG, 'and what it switched off')
  t.match(mitigate.stdout, `breakwater lift ${id}`, 'and how to lift it')
  t.equal((await send(s.proxy, '/checkout')).status, 503)
  const during = await state(url)
  t.same(during.mitigations.map((x: any) => x.id), [id])
  t.same(during.mitigations[0].targets, [FLAG])

  const status = await run(['status', '--admin', url], withToken)
  t.match(status.stdout, id, 'status lists the active mitigation')
  // The mitigation opened an incident: status shows it, opened by the operator.
  const incident = during.incidents[0]
  t.match(incident, { id: /^i-/, trigger: null, mitigation: { id, action: 'killSwitch' } })
  const section = status.stdout.slice(status.stdout.indexOf('\nINCIDENTS\n'))
  t.match(section, /^\nINCIDENTS\n\s+ID\s+STATUS\s+BY\s+MITIGATION\s+DETECTED\s+RESTORED\s+TIME TO RESTORE\n/, 'an INCIDENTS section with its columns')
  t.match(section, new RegExp(`\\n\\s+${String(incident?.id)}\\s+(detected|verifying|unverified|restored)\\s+operator\\s+killSwitch \\(active\\)\\s+${String(incident?.detectedAt).replace(/\./g, '\\.')}\\s`), 'the incident: id, status, who opened it, its mitigation, when')

  const lift = await run(['lift', id, '--reason', 'regression fixed', '--json', '--admin', url], withToken)
  t.equal(lift.code, 0, lift.stderr)
  const lifted = parseOnlyJson(lift)
  t.equal(lifted.id, id)
  t.equal(lifted.status, 'lifted')
  t.equal(lifted.liftReason, 'regression fixed')
  t.equal((await send(s.proxy, '/checkout')).status, 200, 'the route is back')
  t.same((await state(url)).mitigations, [])

  const [again, cb] = await runAll(run, [
    { args: ['lift', id, '--reason', 'twice', '--admin', url], env: withToken },
    // circuitBreak with a named target, in --json mode.
    { args: ['mitigate', 'circuitBreak', 'pay', '--reason', 'dependency failing', '--json', '--admin', url], env: withToken }
  ]) as [CliResult, CliResult]
  t.equal(again.code, 1, 'a lifted mitigation cannot be lifted again')
  t.match(again.stderr, /409/)
  t.equal(cb.code, 0, cb.stderr)
  const record = parseOnlyJson(cb)
  t.equal(record.action, 'circuitBreak')
  t.same(record.targets, ['pay'])
  t.equal(record.status, 'active')
  t.equal((await send(s.proxy, '/pay')).json().error, 'circuit_open')
  const liftCb = await run(['lift', String(record.id), '--reason', 'dependency back', '--admin', url], withToken)
  t.equal(liftCb.code, 0, liftCb.stderr)
  t.match(liftCb.stdout, new RegExp(`mitigation ${String(record.id)}: circuitBreak lifted`))
  t.equal((await send(s.proxy, '/pay')).status, 200)
})

t.test('audit --limit 3 shows the three newest entries', async (t) => {
  const { url } = await fixture(t)
  const run = operator(t)
  // Four audited changes, made through the API directly; the CLI only reads them.
  const steps: Array<[string, string, Record<string, unknown>]> = [
    ['PUT', `/v1/flags/${FLAG}`, { enabled: false }],
    ['DELETE', `/v1/flags/${FLAG}`, {}],
    ['PUT', '/v1/circuits/pay', { state: 'open' }],
    ['PUT', '/v1/circuits/pay', { state: 'auto' }]
  ]
  for (const [i, [method, path, body]] of steps.entries()) {
    t.equal((await admin(url, method, path, { ...body, reason: `step ${i + 1}` }, TOKEN)).status, 200)
  }
  const [human, json] = await runAll(run, [
    { args: ['audit', '--limit', '3', '--admin', url], env: withToken },
    { args: ['audit', '--admin', url, '--json', '--limit', '3'], env: withToken }
  ]) as [CliResult, CliResult]
  t.equal(json.code, 0, json.stderr)
  const entries = parseOnlyJson(json).entries as any[]
  t.equal(entries.length, 3)
  t.same(entries.map((e) => e.reason), ['step 4', 'step 3', 'step 2'], 'newest first')
  for (const e of entries) {
    t.type(e.time, 'string')
    t.type(e.action, 'string')
    t.ok(Array.isArray(e.targets))
    t.type(e.result, 'string')
  }

  t.equal(human.code, 0, human.stderr)
  const lines = human.stdout.trimEnd().split('\n')
  t.equal(lines.length, 4, `a header and three rows: ${human.stdout}`)
  t.match(lines[0], /TIME\s+ACTION\s+TARGETS/)
  t.match(lines[1], /circuit\.force\s+pay/)
  t.match(lines[1], /step 4/)
  t.match(lines[3], /step 2/)
  t.notMatch(human.stdout, /step 1/)
})

t.test('token discovery: the generated STATEDIR/admin.token is found through --config', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  // No token in the environment: the sidecar generates one in its stateDir.
  const s = await startSidecarProcess(t, config(up), { BREAKWATER_ADMIN_TOKEN: undefined })
  const url = adminUrl(s)
  const run = operator(t)
  const sidecarConfig = parse(readFileSync(s.configPath, 'utf8')) as Record<string, any>
  const tokenPath = join(String(sidecarConfig.stateDir), 'admin.token')
  const generated = readFileSync(tokenPath, 'utf8').trim()
  t.ok(generated.length >= 32, 'a token was generated')

  const [status, byFile, none] = await runAll(run, [
    // The config's admin port is 0, so the URL is given; the token comes from the file.
    { args: ['status', '--config', s.configPath, '--admin', url] },
    // --token-file names the file directly.
    { args: ['status', '--json', '--token-file', tokenPath, '--admin', url] },
    // Neither a token nor a config: the CLI cannot authenticate.
    { args: ['status', '--admin', url] }
  ]) as [CliResult, CliResult, CliResult]
  t.equal(status.code, 0, status.stderr)
  t.match(status.stdout, /FLAGS/)
  t.equal(byFile.code, 0, byFile.stderr)
  t.equal(parseOnlyJson(byFile).flags[FLAG].enabled, true)
  t.equal(none.code, 1)
  t.match(none.stderr, /401/)

  const kill = await run(['kill', FLAG, '--reason', 'token from the state dir', '--admin', url, '--config', s.configPath])
  t.equal(kill.code, 0, kill.stderr)
  t.equal((await send(s.proxy, '/checkout')).status, 503)
  // BREAKWATER_CONFIG works like --config.
  const fromEnv = await run(['restore', FLAG, '--reason', 'config from the environment', '--admin', url], { BREAKWATER_CONFIG: s.configPath })
  t.equal(fromEnv.code, 0, fromEnv.stderr)
  t.equal((await send(s.proxy, '/checkout')).status, 200)

  // A copy of the config that names the real admin port: the URL comes from listen.admin too.
  const dir = tempDir(t)
  const copy = join(dir, 'breakwater.yaml')
  const port = Number(new URL(url).port)
  writeFileSync(copy, stringify({ ...sidecarConfig, listen: { ...sidecarConfig.listen, admin: { host: '127.0.0.1', port } } }))
  const both = await run(['kill', FLAG, '--reason', 'everything from the config', '--config', copy])
  t.equal(both.code, 0, both.stderr)
  t.equal((await send(s.proxy, '/checkout')).status, 503)
  const entries = await auditEntries(url, generated)
  t.same(entries.map((e) => e.reason), ['everything from the config', 'config from the environment', 'token from the state dir'])
})

t.test('fan-out: one command acts on several sidecars', async (t) => {
  const a = await fixture(t)
  const b = await fixture(t)
  const run = operator(t)
  const kill = await run(['kill', FLAG, '--reason', 'fleet-wide regression', '--admin', a.url, '--admin', b.url], withToken)
  t.equal(kill.code, 0, kill.stderr)
  t.match(kill.stdout, a.url, 'each sidecar is named')
  t.match(kill.stdout, b.url)
  t.equal((await send(a.s.proxy, '/checkout')).status, 503, 'killed on the first')
  t.equal((await send(b.s.proxy, '/checkout')).status, 503, 'and on the second')
  t.equal((await state(a.url)).flags[FLAG].override.reason, 'fleet-wide regression')
  t.equal((await state(b.url)).flags[FLAG].override.reason, 'fleet-wide regression')

  const restore = await run(['restore', FLAG, '--json', '--reason', 'fixed', '--admin', a.url, '--admin', b.url], withToken)
  t.equal(restore.code, 0, restore.stderr)
  const answers = parseOnlyJson(restore)
  t.ok(Array.isArray(answers), 'one JSON array, one answer per sidecar')
  t.equal(answers.length, 2)
  for (const x of answers) t.equal(x.enabled, true)
  t.equal((await send(a.s.proxy, '/checkout')).status, 200)
  t.equal((await send(b.s.proxy, '/checkout')).status, 200)

  // One sidecar unreachable: the others still act, and the exit code says not all did.
  const partial = await run(['kill', FLAG, '--reason', 'partial fleet', '--admin', a.url, '--admin', 'http://127.0.0.1:1'], withToken)
  t.equal(partial.code, 1)
  t.match(partial.stderr, /cannot reach the admin API at http:\/\/127\.0\.0\.1:1/)
  t.notMatch(partial.stderr, STACK_FRAME)
  t.equal((await send(a.s.proxy, '/checkout')).status, 503, 'the reachable sidecar acted')
  t.equal((await send(b.s.proxy, '/checkout')).status, 200, 'the one not named is untouched')
})
