/**
 * Durations are whole milliseconds from 0 to 2^31 − 1: a longer delay overflows Node.js timers
 * (it fires after 1 ms), so `timeoutMs: 1e308` would time every request out at once.
 */
import t from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { stringify } from 'yaml'
import { resolveConfig, loadConfigFile, ConfigError } from '../src/config/load.js'
import { MAX_DURATION_MS } from '../src/config/duration.js'
import { runCli, tempDir } from './helpers/process.js'

const base = (route: Record<string, unknown>, extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  service: 's',
  upstreams: { app: { url: 'http://127.0.0.1:3000' } },
  routes: [{ match: { pathPrefix: '/' }, upstream: 'app', ...route }],
  ...extra
})

function problems (raw: Record<string, unknown>): readonly string[] {
  try {
    resolveConfig(raw, { env: {} })
  } catch (err) {
    if (err instanceof ConfigError) return err.problems
    throw err
  }
  return []
}

const AT_MOST = `must be at most ${MAX_DURATION_MS} ms`

t.test('a duration longer than a timer can wait is refused, naming the key and the bound', async (t) => {
  t.equal(MAX_DURATION_MS, 2147483647)
  t.match(problems(base({ timeoutMs: 1e308 })), [`routes[0].timeoutMs: ${AT_MOST} (about 24.8 days, the longest timer Node.js can set) (got 1e+308)`])
  t.match(problems(base({ timeoutMs: MAX_DURATION_MS + 1 })), [`routes[0].timeoutMs: ${AT_MOST}`])
  t.match(problems(base({ idleTimeoutMs: '597h' })), [`routes[0].idleTimeoutMs: ${AT_MOST}`], 'a string too: 597h is just over the bound')
  t.match(problems(base({}, { upstreams: { app: { url: 'http://127.0.0.1:3000', healthCheck: { path: '/h', intervalMs: '99999999h' } } } })), [`upstreams.app.healthCheck.intervalMs: ${AT_MOST}`], 'nested in a record')
  t.match(problems(base({}, { rollback: { type: 'exec', command: ['true'], requireRecentChange: '100000000m' } })), [`rollback.requireRecentChange: ${AT_MOST}`], 'inside a union')
  t.match(problems(base({}, { rollbackTriggers: [{ metric: 'error_rate', threshold: 0.5, window: '1m', action: 'notify', for: '9999999h' }] })), [`rollbackTriggers[0].for: ${AT_MOST}`], 'in a list')
})

t.test('negative, fractional and infinite durations are refused; the bound itself is accepted', async (t) => {
  for (const bad of [-1, 1.5]) {
    t.match(problems(base({ timeoutMs: bad })), [/^routes\[0\]\.timeoutMs: must be milliseconds, or a string/], `${bad} is refused`)
  }
  for (const bad of [Infinity, Number.NaN]) {
    t.same(problems(base({ timeoutMs: bad })), [`routes[0].timeoutMs: must be a finite number of milliseconds (got ${bad})`], `${bad} is refused`)
  }
  t.equal(resolveConfig(base({ timeoutMs: MAX_DURATION_MS }), { env: {} }).config.routes[0]?.timeoutMs, MAX_DURATION_MS)
  t.equal(resolveConfig(base({ timeoutMs: '596h' }), { env: {} }).config.routes[0]?.timeoutMs, 596 * 3_600_000)
})

t.test('the loader and `breakwater validate` report it from a file', async (t) => {
  const dir = tempDir(t)
  const path = join(dir, 'breakwater.yaml')
  writeFileSync(path, stringify(base({ timeoutMs: 1e308 })))
  const loaded = await loadConfigFile(path, {}).then(() => [], (err: ConfigError) => err.problems)
  t.match(loaded, [new RegExp(`^routes\\[0\\]\\.timeoutMs: ${AT_MOST}`)], 'the loader refuses it')
  const result = await runCli(['validate', '--config', path], { env: { BREAKWATER_CONFIG: undefined } })
  t.equal(result.code, 1, 'exit 1')
  t.match(result.stderr, new RegExp(`^routes\\[0\\]\\.timeoutMs: ${AT_MOST} \\(about 24\\.8 days`, 'm'), 'the problem names the key and the bound')
})

t.test('a duration string is digits and a unit, or digits alone (milliseconds): "1e3" and "0x10" are refused, not read as 1 and 16 ms', async (t) => {
  const timeoutMs = (value: unknown, env: NodeJS.ProcessEnv = {}): number | undefined => resolveConfig(base({ timeoutMs: value }), { env }).config.routes[0]?.timeoutMs
  for (const bad of ['1e3', '0x10', '0b11', '0o7', '1.5', ' 12', '12 ', '+5', '1_000', 'Infinity', '1e3s']) {
    t.same(problems(base({ timeoutMs: bad })), [`routes[0].timeoutMs: must be milliseconds, or a string such as 500ms, 30s, 5m, 1h; at most ${MAX_DURATION_MS} ms (about 24.8 days) (got ${JSON.stringify(bad)})`], `${JSON.stringify(bad)} is refused, naming the key`)
  }
  t.same(problems(base({}, { shutdown: { drainDelayMs: '0x10' } })), [`shutdown.drainDelayMs: must be milliseconds, or a string such as 500ms, 30s, 5m, 1h; at most ${MAX_DURATION_MS} ms (about 24.8 days) (got "0x10")`], 'in any section')
  t.same(problems(base({}, { listen: { proxy: { port: '1e3' } } })), ['listen.proxy.port: must be an integer'], 'nor is any other number read from such a string')
  // What worked stays working: digits alone (milliseconds, as from ${ENV}), and digits with a unit.
  t.equal(timeoutMs('1000'), 1000)
  t.equal(timeoutMs('${T:-1500}'), 1500)
  t.equal(timeoutMs('${T}', { T: '2500' }), 2500)
  t.equal(timeoutMs('1.5s'), 1500)
  t.equal(timeoutMs('2m'), 120_000)
  t.equal(resolveConfig(base({}, { circuitBreakers: { app: { failureThreshold: '0.25' } } }), { env: {} }).config.circuitBreakers.app?.failureThreshold, 0.25, 'a decimal where the schema takes one')
})
