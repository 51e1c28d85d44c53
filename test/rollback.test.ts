import t from 'tap'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar, testSidecarInput } from './helpers/sidecar.js'
import { startReceiver } from './helpers/receiver.js'
import { admin } from './helpers/admin.js'
import { eventually } from './helpers/http.js'
import { resolveConfig } from '../src/config/load.js'
import { idempotencyKey } from '../src/control/rollback.js'

/** Start a rollback (202, running) and wait for it to end. */
async function rollbackAndWait (base: string, reason: string): Promise<{ status: number, body: any }> {
  const started = await admin(base, 'POST', '/v1/mitigations', { action: 'rollback', reason })
  if (started.status !== 202) return started
  // Its audit line is the last thing a rollback writes.
  await eventually(async () => (await admin(base, 'GET', '/v1/audit?limit=5')).body.entries.some((e: any) => e.action === 'mitigation.rollback.result' && e.id === started.body.id), 30_000)
  return { status: started.status, body: (await admin(base, 'GET', `/v1/mitigations/${started.body.id as string}`)).body }
}

function config (url: string, rollback: Record<string, unknown> | undefined, version = '2.4.1'): Record<string, unknown> {
  return {
    service: 'checkout',
    version,
    upstreams: { app: { url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    ...(rollback === undefined ? {} : { rollback })
  }
}

t.test('webhook rollback: POST with service, version, trigger, reason and an Idempotency-Key; never the same version twice', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const receiver = await startReceiver([202])
  t.teardown(receiver.close)
  const s = await startTestSidecar(t, config(up.url, { type: 'webhook', url: `${receiver.url}/rollback`, headers: { 'x-cd-token': 'abc' } }))
  const m = await rollbackAndWait(s.admin, 'errors after 2.4.1')
  t.equal(m.status, 202)
  t.equal(m.body.action, 'rollback')
  t.same(m.body.targets, ['2.4.1'])
  t.equal(m.body.status, 'succeeded')
  t.equal(m.body.result.ok, true)
  t.equal(receiver.deliveries.length, 1)
  const d = receiver.deliveries[0]
  t.equal(d?.method, 'POST')
  t.equal(d?.url, '/rollback')
  t.same(d?.body, { service: 'checkout', version: '2.4.1', trigger: null, reason: 'errors after 2.4.1' })
  t.equal(d?.headers['idempotency-key'], idempotencyKey({ service: 'checkout', version: '2.4.1', trigger: null }))
  t.equal(d?.headers['x-cd-token'], 'abc', 'configured headers are sent')
  const again = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'again' })
  t.equal(again.status, 409)
  t.equal(again.body.error, 'already_rolled_back')
  t.equal(receiver.deliveries.length, 1)
  const audit = await admin(s.admin, 'GET', '/v1/audit?limit=3')
  t.match(audit.body.entries.find((e: any) => e.action === 'mitigation.rollback'), { result: 'running', targets: ['2.4.1'] })
  t.match(audit.body.entries.find((e: any) => e.action === 'mitigation.rollback.result'), { result: 'succeeded', targets: ['2.4.1'] })
  t.match(audit.body.entries.find((e: any) => e.action === 'refused'), { wanted: 'mitigation.rollback', result: 'already_rolled_back', reason: 'again', targets: ['2.4.1'] }, 'the refused rollback names the version it was about')
})

t.test('webhook rollback is retried with backoff on 5xx, with the same Idempotency-Key; a 4xx is not retried', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const receiver = await startReceiver([503, 500, 200])
  t.teardown(receiver.close)
  const s = await startTestSidecar(t, config(up.url, { type: 'webhook', url: receiver.url, retries: 3 }))
  const m = await rollbackAndWait(s.admin, 'flaky receiver')
  t.equal(m.body.status, 'succeeded')
  t.equal(m.body.result.attempts, 3)
  t.equal(receiver.deliveries.length, 3)
  t.equal(new Set(receiver.deliveries.map((d) => d.headers['idempotency-key'])).size, 1, 'one key for every retry')
  const gaps = receiver.deliveries.slice(1).map((d, i) => d.at - (receiver.deliveries[i]?.at ?? 0))
  t.ok(gaps.every((g) => g >= 150), `backoff between attempts (${gaps.join(', ')} ms)`)

  const refusing = await startReceiver([400])
  t.teardown(refusing.close)
  const s2 = await startTestSidecar(t, config(up.url, { type: 'webhook', url: refusing.url, retries: 3 }))
  const failed = await rollbackAndWait(s2.admin, 'x')
  t.equal(failed.body.status, 'failed')
  t.match(failed.body.error, /the rollback action failed: status 400/)
  t.equal(refusing.deliveries.length, 1, 'a 4xx is final')
  t.equal(failed.body.result.status, 400)
})

t.test('rollback cooldown: one rollback per cooldown, even for a new version', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const receiver = await startReceiver([200])
  t.teardown(receiver.close)
  const rollback = { type: 'webhook', url: receiver.url, cooldown: '10m' }
  const s = await startTestSidecar(t, config(up.url, rollback, '1.0.0'))
  t.equal((await rollbackAndWait(s.admin, 'first')).body.status, 'succeeded')
  const { config: next } = resolveConfig(testSidecarInput(config(up.url, rollback, '0.9.9'), s.stateDir))
  await s.sidecar.apply(next)
  const second = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'second' })
  t.equal(second.status, 409)
  t.equal(second.body.error, 'rollback_cooldown')
  t.ok(Number(second.headers.get('retry-after')) > 500, 'retry-after says when')
  t.equal(receiver.deliveries.length, 1)
})

t.test('exec rollback runs the argv with BREAKWATER_* in its environment; failures and timeouts are reported', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-exec-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const out = join(dir, 'env.json')
  const script = `require('fs').writeFileSync(${JSON.stringify(out)}, JSON.stringify({ service: process.env.BREAKWATER_SERVICE, version: process.env.BREAKWATER_VERSION, trigger: process.env.BREAKWATER_TRIGGER, argv: process.argv.slice(1) }))`
  const s = await startTestSidecar(t, config(up.url, { type: 'exec', command: [process.execPath, '-e', script, 'undo'] }))
  const m = await rollbackAndWait(s.admin, 'bad release')
  t.equal(m.body.status, 'succeeded')
  t.equal(m.body.result.exitCode, 0)
  t.same(JSON.parse(readFileSync(out, 'utf8')), { service: 'checkout', version: '2.4.1', trigger: '', argv: ['undo'] })

  const failing = await startTestSidecar(t, config(up.url, { type: 'exec', command: [process.execPath, '-e', 'console.error("kubectl: no such deployment"); process.exit(3)'] }))
  const f = await rollbackAndWait(failing.admin, 'x')
  t.equal(f.body.status, 'failed')
  t.equal(f.body.result.exitCode, 3)
  t.match(f.body.result.output, /no such deployment/)

  const slow = await startTestSidecar(t, config(up.url, { type: 'exec', command: [process.execPath, '-e', 'setTimeout(() => {}, 60000)'], timeoutMs: 300 }))
  const timedOut = await rollbackAndWait(slow.admin, 'x')
  t.equal(timedOut.body.status, 'failed')
  t.match(timedOut.body.result.error, /timed out after 300 ms/, 'the command was stopped at its timeout')

  const missing = await startTestSidecar(t, config(up.url, { type: 'exec', command: [join(dir, 'no-such-binary')] }))
  t.equal((await rollbackAndWait(missing.admin, 'x')).body.status, 'failed')
})

t.test('an exec rollback\'s timeout stops the whole process group, and the record fails without waiting for a grandchild', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-exec-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  // The shell's child, not the shell, would write the marker when its sleep ends; it holds the
  // shell's stdout and stderr meanwhile.
  const marker = join(dir, 'grandchild-finished')
  const grandchild = `sh -c 'sleep 6; touch "${marker}"'`
  const s = await startTestSidecar(t, config(up.url, { type: 'exec', command: ['sh', '-c', `${grandchild}; echo done`], timeoutMs: 500 }))
  const started = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'bad release' })
  t.equal(started.status, 202)
  t.ok(await eventually(async () => (await admin(s.admin, 'GET', `/v1/mitigations/${started.body.id as string}`)).body.status !== 'running', 30_000), 'the rollback ended')
  t.notOk(existsSync(marker), 'the record failed before the grandchild could have finished')
  const m = (await admin(s.admin, 'GET', `/v1/mitigations/${started.body.id as string}`)).body
  t.equal(m.status, 'failed')
  t.match(m.result.error, /timed out after 500 ms/)
  // Killed with its group: it never finishes.
  await new Promise((resolve) => setTimeout(resolve, 6500))
  t.notOk(existsSync(marker), 'the grandchild was stopped with the command')
})

t.test('an exec rollback that exits while a process it started holds its output ends at its exit', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-exec-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const marker = join(dir, 'background-finished')
  const pidFile = join(dir, 'background.pid')
  // A background process (a daemon the command starts) keeps the inherited stdout and stderr.
  const s = await startTestSidecar(t, config(up.url, { type: 'exec', command: ['sh', '-c', `(sleep 6; touch "${marker}") & echo $$ > "${pidFile}"; echo rolled back`], timeoutMs: 60_000 }))
  t.teardown(() => { try { process.kill(-Number(readFileSync(pidFile, 'utf8')), 'SIGKILL') } catch {} })
  const m = await rollbackAndWait(s.admin, 'bad release')
  t.notOk(existsSync(marker), 'the record ended before the background process did')
  t.equal(m.body.status, 'succeeded')
  t.equal(m.body.result.exitCode, 0)
  t.match(m.body.result.output, /rolled back/)
})

t.test('rollback without a configured action is refused', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, config(up.url, undefined))
  const r = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'x' })
  t.equal(r.status, 409)
  t.equal(r.body.error, 'rollback_not_configured')
})

t.test('the idempotency key depends only on service, version and trigger', async (t) => {
  const a = idempotencyKey({ service: 'checkout', version: '1', trigger: 'error-rate' })
  t.equal(a, idempotencyKey({ service: 'checkout', version: '1', trigger: 'error-rate' }), 'the same on every sidecar')
  t.not(a, idempotencyKey({ service: 'checkout', version: '2', trigger: 'error-rate' }))
  t.not(a, idempotencyKey({ service: 'checkout', version: '1', trigger: null }))
})
