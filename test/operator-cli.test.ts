/**
 * The operator commands of the real binary (SPEC §1, §13, §14) against real sidecar
 * processes in front of a real upstream: status, kill, restore, circuit; options anywhere;
 * --json; refusals. (Mitigations, audit, token discovery and fan-out: operator-cli-mitigations.)
 */
import t from 'tap'
import http from 'node:http'
import https from 'node:https'
import { once } from 'node:events'
import { readFileSync } from 'node:fs'
import net, { type AddressInfo } from 'node:net'
import { createPki } from './helpers/certificates.js'
import { type CliResult } from './helpers/process.js'
import { send } from './helpers/http.js'
import { startUpstream } from './helpers/upstream.js'
import { operator, runAll, parseOnlyJson, STACK_FRAME, FLAG, fixture, withToken, state, auditEntries } from './helpers/operator.js'

// Every command is a fresh Node process; leave room for a busy machine.
t.setTimeout(600_000)

t.test('status, and commands that are refused or fail: all change nothing', async (t) => {
  const { s, url } = await fixture(t)
  const run = operator(t)
  const noReason = [
    ['kill', FLAG],
    ['circuit', 'pay', 'open'],
    ['mitigate', 'killSwitch'],
    ['lift', 'm-anything'],
    ['restore', FLAG, '--reason', '   ', '--json']
  ]
  const [human, json, unknown, unknownJson, wrong, unreachable, unreachableJson, noToken, strayRollback, strayKill, ...missing] = await runAll(run, [
    { args: ['status', '--admin', url], env: withToken },
    { args: ['status', '--json', '--admin', url], env: withToken },
    { args: ['kill', 'noSuchFlag', '--reason', 'x', '--admin', url], env: withToken },
    { args: ['kill', 'noSuchFlag', '--reason', 'x', '--json', '--admin', url], env: withToken },
    { args: ['kill', FLAG, '--reason', 'x', '--admin', url], env: { BREAKWATER_ADMIN_TOKEN: 'wrong' } },
    { args: ['status', '--admin', 'http://127.0.0.1:1'], env: withToken },
    { args: ['kill', FLAG, '--reason', 'x', '--json', '--admin', 'http://127.0.0.1:1'], env: withToken },
    { args: ['status', '--admin', url] },
    { args: ['mitigate', 'rollback', 'v2', '--reason', 'back to v2', '--admin', url], env: withToken },
    { args: ['kill', FLAG, 'unrelated', '--reason', 'two flags', '--admin', url], env: withToken },
    ...noReason.map((args) => ({ args: [...args, '--admin', url], env: withToken }))
  ]) as [CliResult, ...CliResult[]]
  // Options a command does not take: each would widen or prolong what the operator asked for
  // (a kill with no end, every kill-switch flag instead of one route) were it ignored.
  const foreignOptions: Array<[string[], RegExp]> = [
    [['mitigate', 'killSwitch', FLAG, '--ttl', '2s'], /--ttl is not an option of "mitigate killSwitch" \(a kill that lapses on its own is "breakwater kill FLAG --ttl D"\)/],
    [['mitigate', 'killSwitch', '--route', 'checkout'], /--route is not an option of "mitigate killSwitch"/],
    [['mitigate', 'circuitBreak', 'pay', '--rps', '5'], /--rps is not an option of "mitigate circuitBreak"/],
    [['restore', FLAG, '--ttl', '5m'], /--ttl is not an option of "restore"/],
    [['circuit', 'pay', 'open', '--to', 'app'], /--to is not an option of "circuit" \(its options: --admin, --token-file, --config, --json, --timeout, --reason, --ttl, --fleet\)/],
    [['kill', FLAG, '--limit', '3'], /--limit is not an option of "kill"/],
    [['lift', 'm-anything', '--ttl', '1m'], /--ttl is not an option of "lift"/],
    [['status', '-r', 'x'], /-r \(--reason\) is not an option of "status"/]
  ]
  const foreign = await runAll(run, foreignOptions.map(([args]) => ({ args: [...args, '--reason', 'x', '--admin', url], env: withToken })))

  t.test('an option the command does not take: exit 2 naming the option and the command, nothing sent', async (t) => {
    for (const [i, r] of foreign.entries()) {
      const [args, message] = foreignOptions[i] as [string[], RegExp]
      const label = args.join(' ')
      t.equal(r.code, 2, `${label}: exit 2`)
      t.match(r.stderr, message, `${label}: names the option and the command`)
      t.equal(r.stdout, '', `${label}: nothing on stdout`)
      t.notMatch(r.stderr, STACK_FRAME)
    }
  })

  t.test('status: a table for people mentioning flags and circuits', async (t) => {
    t.equal(human.code, 0, human.stderr)
    t.match(human.stdout, /FLAGS/)
    t.match(human.stdout, /CIRCUITS/)
    t.match(human.stdout, /MITIGATIONS/)
    t.match(human.stdout, new RegExp(`${FLAG}\\s+on\\b`), 'the kill-switch flag and its value')
    t.match(human.stdout, /\bcheckout\b/, 'the route it guards')
    t.match(human.stdout, /\bpay\s+closed\b/, 'the breaker and its state')
    t.throws(() => JSON.parse(human.stdout), 'the default output is not JSON')
    t.notMatch(human.stderr, STACK_FRAME)
  })

  t.test('status --json prints only JSON', async (t) => {
    t.equal(json.code, 0, json.stderr)
    const body = parseOnlyJson(json)
    t.equal(body.flags[FLAG].enabled, true)
    t.equal(body.flags.unrelated.enabled, true)
    t.equal(body.circuits.pay.state, 'closed')
    t.equal(body.circuits.pay.forced, null)
    t.same(body.mitigations, [])
    t.equal(json.stderr, '', 'nothing else is printed')
  })

  t.test('a mutating command without --reason exits 2 with a message', async (t) => {
    for (const [i, r] of missing.entries()) {
      const label = (noReason[i] as string[]).join(' ')
      t.equal(r.code, 2, `${label}: exit 2`)
      t.match(r.stderr, /--reason/, `${label}: says what is missing`)
      t.notMatch(r.stderr, STACK_FRAME, `${label}: no stack trace`)
      t.equal(r.stdout, '', `${label}: nothing on stdout`)
    }
  })

  t.test('a stray word is refused, never ignored: exit 2, nothing sent', async (t) => {
    t.equal(strayRollback.code, 2, 'mitigate rollback v2: exit 2')
    t.match(strayRollback.stderr, /mitigate rollback takes no target \(got "v2"\)/, 'says a version cannot be chosen')
    t.equal(strayKill.code, 2, 'kill FLAG unrelated: exit 2')
    t.match(strayKill.stderr, /unexpected "unrelated"; usage: breakwater kill FLAG/)
    for (const r of [strayRollback, strayKill]) {
      t.equal(r.stdout, '')
      t.notMatch(r.stderr, STACK_FRAME)
    }
  })

  t.test("an unknown flag: exit 1 with the sidecar's message", async (t) => {
    t.equal(unknown.code, 1)
    t.match(unknown.stderr, /flag "noSuchFlag" is not defined/)
    t.match(unknown.stderr, /404/)
    t.notMatch(unknown.stderr, STACK_FRAME)
    t.equal(unknownJson.code, 1)
    const refusal = parseOnlyJson(unknownJson)
    t.equal(refusal.status, 404, 'with --json the refusal is JSON too')
    t.equal(refusal.error, 'unknown_flag')
  })

  t.test('a wrong token or none: exit 1, 401 unauthorized', async (t) => {
    t.equal(wrong.code, 1)
    t.match(wrong.stderr, /401/)
    t.match(wrong.stderr, /unauthorized/i)
    t.notMatch(wrong.stderr, STACK_FRAME)
    t.equal(noToken.code, 1)
    t.match(noToken.stderr, /401/)
    t.match(noToken.stderr, /BREAKWATER_ADMIN_TOKEN/, 'with a hint where a token comes from')
  })

  t.test('an unreachable sidecar: exit 1, "cannot reach", no stack trace', async (t) => {
    t.equal(unreachable.code, 1)
    t.match(unreachable.stderr, /cannot reach/)
    t.match(unreachable.stderr, 'http://127.0.0.1:1')
    t.notMatch(unreachable.stderr, STACK_FRAME)
    t.equal(unreachable.stdout, '')
    t.equal(unreachableJson.code, 1)
    const body = parseOnlyJson(unreachableJson)
    t.equal(body.error, 'unreachable')
    t.equal(body.admin, 'http://127.0.0.1:1')
    t.equal(body.timedOut, undefined, 'a refused connection is not a wait that ran out')
    t.equal(body.mayHaveApplied, undefined)
  })

  t.test('nothing was changed', async (t) => {
    t.equal((await send(s.proxy, '/checkout')).status, 200, 'the flag is still on')
    t.equal((await send(s.proxy, '/pay')).status, 200, 'the circuit is still closed')
    const st = await state(url)
    t.equal(st.flags[FLAG].origin, 'config')
    t.equal(st.circuits.pay.forced, null)
    t.same(st.mitigations, [])
    t.same((await auditEntries(url)).map((e) => [e.action, e.wanted, e.result]), [['refused', 'flag.override', 'unknown_flag'], ['refused', 'flag.override', 'unknown_flag']], 'nothing was audited but the two refusals, as such')
  })
})

t.test('--admin aimed at something else that answers 200 (the proxy port, the app): exit 1, never a false "applied", never a stack trace', async (t) => {
  // The app behind the proxy port answers every path: one with JSON of its own, one with a page.
  const jsonApp = await startUpstream()
  t.teardown(jsonApp.close)
  const pageApp = await startUpstream((_req, res) => { res.writeHead(200, { 'content-type': 'text/html' }); res.end('<html>shop</html>') })
  t.teardown(pageApp.close)
  const run = operator(t)
  const commands = [
    ['status'],
    ['triage'],
    ['audit'],
    ['kill', FLAG, '--reason', 'checkout errors'],
    ['restore', FLAG, '--reason', 'fixed'],
    ['circuit', 'pay', 'open', '--reason', 'pay down'],
    ['mitigate', 'killSwitch', '--reason', 'errors'],
    ['lift', 'm-anything', '--reason', 'done'],
    ['incident', 'report', 'i-anything']
  ]
  const runs = commands.flatMap((args) => [jsonApp.url, pageApp.url].flatMap((url) => [
    { args: [...args, '--admin', url], env: withToken },
    { args: [...args, '--json', '--admin', url], env: withToken }
  ]))
  const results = await runAll(run, runs)
  for (const [i, r] of results.entries()) {
    const { args } = runs[i] as { args: string[] }
    const label = args.join(' ')
    t.equal(r.code, 1, `${label}: exit 1 (${r.stdout.slice(0, 80)})`)
    t.notMatch(r.stderr, STACK_FRAME, `${label}: no stack trace`)
    if (args.includes('--json')) {
      const body = parseOnlyJson(r)
      t.match(body, { error: 'not_admin_api', status: 200 }, `${label}: the JSON says it was not the admin API`)
    } else {
      t.equal(r.stdout, '', `${label}: nothing printed as if it had worked`)
      t.match(r.stderr, /not as a Breakwater admin API.*listen\.admin/, `${label}: says what is wrong`)
    }
  }
})

t.test('a hung admin API (accepts, never answers): every command ends with exit 1 and says so; --timeout changes the wait', async (t) => {
  // A sidecar whose event loop is stuck, or a port that accepts and stalls: the connection is
  // taken and the request read, and nothing ever comes back.
  const sockets = new Set<net.Socket>()
  const hung = net.createServer((socket) => { sockets.add(socket); socket.on('close', () => sockets.delete(socket)); socket.resume() })
  hung.listen(0, '127.0.0.1')
  await once(hung, 'listening')
  t.teardown(async () => {
    for (const socket of sockets) socket.destroy()
    await new Promise((resolve) => hung.close(resolve))
  })
  const url = `http://127.0.0.1:${(hung.address() as AddressInfo).port}`
  const run = operator(t)
  const runs = [
    { args: ['status', '--admin', url], env: withToken },
    { args: ['triage', '--admin', url], env: withToken },
    { args: ['kill', FLAG, '--reason', 'checkout errors', '--admin', url], env: withToken },
    { args: ['circuit', 'pay', 'open', '--reason', 'pay down', '--json', '--admin', url], env: withToken },
    { args: ['status', '--timeout', '1s', '--json', '--admin', url], env: withToken }
  ]
  const [status, triage, kill, circuitJson, shortJson] = await runAll(run, runs, 5) as CliResult[]
  for (const [i, r] of [status, triage, kill].entries()) {
    const label = (runs[i] as { args: string[] }).args.slice(0, 2).join(' ')
    t.equal(r?.signal, null, `${label}: the command ended on its own`)
    t.equal(r?.code, 1, `${label}: exit 1, as for a sidecar that cannot be reached`)
    t.match(r?.stderr, `the admin API at ${url} gave no answer within 5 s`, `${label}: says the sidecar did not answer, and after how long`)
    t.match(r?.stderr, /--timeout/, `${label}: says how to wait longer`)
    t.notMatch(r?.stderr, STACK_FRAME, `${label}: no stack trace`)
    t.equal(r?.stdout, '', `${label}: nothing printed as if it had worked`)
  }
  t.match(kill?.stderr, 'the kill may still have been applied: `breakwater status` shows it', 'a change asked for: the operator is told it may have landed')
  t.notMatch(status?.stderr, /may still have been applied/, 'a read: nothing to have landed')
  t.equal(circuitJson?.code, 1)
  t.match(parseOnlyJson(circuitJson as CliResult), { admin: url, error: 'unreachable', message: 'no answer within 5 s', timedOut: true, mayHaveApplied: true },
    'a script can tell a wait that ran out from a refused connection, and that the change may have landed')
  t.equal(shortJson?.code, 1)
  t.match(parseOnlyJson(shortJson as CliResult), { error: 'unreachable', message: 'no answer within 1 s', timedOut: true, mayHaveApplied: false }, 'a read: nothing to have landed')
  const [bad] = await runAll(run, [{ args: ['status', '--timeout', 'soon', '--admin', url], env: withToken }])
  t.equal(bad?.code, 2, 'a --timeout that is not a duration is a usage error')
  t.match(bad?.stderr, '--timeout must be a duration')
})

t.test('kill turns the route off at once, restore turns it back on; options anywhere; --json', async (t) => {
  const { s, url } = await fixture(t)
  const run = operator(t)
  t.equal((await send(s.proxy, '/checkout')).status, 200)

  const kill = await run(['kill', FLAG, '--reason', 'checkout errors after deploy', '--admin', url], withToken)
  t.equal(kill.code, 0, kill.stderr)
  t.match(kill.stdout, FLAG)
  t.match(kill.stdout, /OFF/)
  const refused = await send(s.proxy, '/checkout/cart')
  t.equal(refused.status, 503, 'the next request is refused')
  t.equal(refused.json().error, 'feature_disabled')
  t.equal(refused.headers['x-breakwater-mitigation'], 'kill-switch')
  t.equal((await send(s.proxy, '/other')).status, 200, 'other routes are untouched')
  const killed = await state(url)
  t.equal(killed.flags[FLAG].enabled, false)
  t.equal(killed.flags[FLAG].origin, 'local')
  t.equal(killed.flags[FLAG].override.reason, 'checkout errors after deploy')

  const restore = await run(['restore', FLAG, '--reason', 'fixed forward', '--admin', url], withToken)
  t.equal(restore.code, 0, restore.stderr)
  t.match(restore.stdout, FLAG)
  t.match(restore.stdout, /ON/)
  t.equal((await send(s.proxy, '/checkout/cart')).status, 200, 'back on')
  t.equal((await state(url)).flags[FLAG].origin, 'config', 'the override is gone')

  // Options first and positionals last, in --json mode: only JSON on stdout.
  const early = await run(['--reason', 'options first', '--json', 'kill', FLAG, '--admin', url], withToken)
  t.equal(early.code, 0, early.stderr)
  const earlyBody = parseOnlyJson(early)
  t.equal(earlyBody.flag, FLAG)
  t.equal(earlyBody.enabled, false)
  t.equal(earlyBody.reason, 'options first')
  t.equal(earlyBody.persisted, true)
  t.equal((await send(s.proxy, '/checkout')).status, 503)
  // Options around and between positionals, with the short form of --reason.
  const mixed = await run(['--admin', url, 'restore', '-r', 'mixed order', FLAG, '--json'], withToken)
  t.equal(mixed.code, 0, mixed.stderr)
  const mixedBody = parseOnlyJson(mixed)
  t.equal(mixedBody.flag, FLAG)
  t.equal(mixedBody.enabled, true)
  t.equal(mixedBody.override, null)
  t.equal((await send(s.proxy, '/checkout')).status, 200)

  const entries = await auditEntries(url)
  t.same(entries.map((e) => [e.action, e.reason]), [
    ['flag.clear', 'mixed order'],
    ['flag.override', 'options first'],
    ['flag.clear', 'fixed forward'],
    ['flag.override', 'checkout errors after deploy']
  ], 'each command is one audit entry with its reason')
  for (const e of entries) t.same(e.targets, [FLAG])
})

t.test('an https:// admin URL (a TLS front before the admin port): the command speaks TLS to it', async (t) => {
  const { s, url } = await fixture(t)
  const pki = createPki(t)
  const server = pki.issue('front', 2)
  const seen: string[] = []
  // Terminates TLS and passes each request on to the sidecar's plain admin port.
  const front = https.createServer({ cert: readFileSync(server.cert), key: readFileSync(server.key) }, (req, res) => {
    seen.push(`${req.method ?? ''} ${req.url ?? ''}`)
    const inner = http.request(new URL(req.url ?? '/', url), { method: req.method, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers)
      answer.pipe(res)
    })
    inner.on('error', () => { res.writeHead(502).end() })
    req.pipe(inner)
  })
  front.listen(0, '127.0.0.1')
  await once(front, 'listening')
  t.teardown(() => { front.closeAllConnections(); front.close() })
  const frontUrl = `https://127.0.0.1:${(front.address() as AddressInfo).port}`

  const kill = await operator(t)(['kill', FLAG, '--reason', 'over TLS', '--admin', frontUrl], { ...withToken, NODE_EXTRA_CA_CERTS: pki.ca })
  t.equal(kill.code, 0, kill.stderr)
  t.match(kill.stdout, /OFF/)
  t.ok(seen.some((r) => r.startsWith('PUT ') || r.startsWith('POST ')), `the front was asked (${seen.join(', ')})`)
  t.equal((await send(s.proxy, '/checkout')).status, 503, 'and the route is off')
})

t.test('circuit UPSTREAM open forces the breaker open; auto hands it back', async (t) => {
  const { s, url } = await fixture(t)
  const run = operator(t)
  t.equal((await send(s.proxy, '/pay/charge')).status, 200)

  const open = await run(['circuit', 'pay', 'open', '--reason', 'payment provider is down', '--admin', url], withToken)
  t.equal(open.code, 0, open.stderr)
  t.match(open.stdout, /pay/)
  t.match(open.stdout, /forced open/)
  const refused = await send(s.proxy, '/pay/charge')
  t.equal(refused.status, 503)
  t.equal(refused.json().error, 'circuit_open')
  t.equal(refused.headers['x-breakwater-mitigation'], 'circuit-open')
  t.equal((await send(s.proxy, '/checkout')).status, 200, 'other upstreams are untouched')
  const st = await state(url)
  t.equal(st.circuits.pay.state, 'open')
  t.equal(st.circuits.pay.forced, 'open')

  const status = await run(['status', '--admin', url], withToken)
  t.equal(status.code, 0, status.stderr)
  t.match(status.stdout, /\bpay\s+open\s+open\b/, 'status shows the forced circuit')

  const auto = await run(['circuit', '--json', 'pay', 'auto', '--reason', 'provider recovered', '--admin', url], withToken)
  t.equal(auto.code, 0, auto.stderr)
  const autoBody = parseOnlyJson(auto)
  t.equal(autoBody.upstream, 'pay')
  t.equal(autoBody.forced, null)
  t.equal(autoBody.state, 'closed')
  t.equal((await send(s.proxy, '/pay/charge')).status, 200)
  const after = await state(url)
  t.equal(after.circuits.pay.forced, null)
  t.equal(after.circuits.pay.state, 'closed')

  const [bad, unknown] = await runAll(run, [
    { args: ['circuit', 'pay', 'sideways', '--reason', 'x', '--admin', url], env: withToken },
    { args: ['circuit', 'nowhere', 'open', '--reason', 'x', '--admin', url], env: withToken }
  ]) as [CliResult, CliResult]
  t.equal(bad.code, 2, 'a state other than open|closed|auto is a usage error')
  t.match(bad.stderr, /open\|closed\|auto/)
  t.equal(unknown.code, 1)
  t.match(unknown.stderr, /nowhere/)
  t.match(unknown.stderr, /404/)
  t.equal((await state(url)).circuits.pay.forced, null, 'neither changed anything')
})
