/**
 * deploy/prometheus/: the rules pass `promtool check rules`, their unit tests pass
 * `promtool test rules` (and fail when a rule is broken), every alert carries a runbook that
 * exists in README.md and a firing test case, every metric the rules read is one Breakwater
 * exports, and `promtool check metrics` finds nothing to fix in a live sidecar's breakwater_*
 * metrics.
 */
import t from 'tap'
import { copyFileSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { parse } from 'yaml'
import { ROOT } from './helpers/root.js'
import { breakwaterMetrics, promtool } from './helpers/promtool.js'
import { tempDir } from './helpers/process.js'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { send } from './helpers/http.js'

const DIR = join(ROOT, 'deploy', 'prometheus')
const RULES = 'breakwater.rules.yaml'

interface Rule { record?: string, alert?: string, expr: string, for?: string, labels?: Record<string, string>, annotations?: Record<string, string> }
const groups = (parse(readFileSync(join(DIR, RULES), 'utf8')) as { groups: Array<{ name: string, rules: Rule[] }> }).groups
const rules = groups.flatMap((g) => g.rules)
const alerts = rules.filter((r) => r.alert !== undefined)
const testFiles = readdirSync(DIR).filter((f) => f.endsWith('.test.yaml'))

t.test('promtool check rules accepts the rules', async (t) => {
  const result = await promtool(['check', 'rules', RULES], { cwd: DIR })
  t.equal(result.code, 0, result.output.trim())
  t.match(result.output, new RegExp(`SUCCESS: ${rules.length} rules found`))
})

t.test('the promtool unit tests pass', async (t) => {
  t.ok(testFiles.length > 0, `unit test files: ${testFiles.join(', ')}`)
  for (const file of testFiles) {
    const result = await promtool(['test', 'rules', file], { cwd: DIR })
    t.equal(result.code, 0, `${file}: ${result.output.trim().split('\n').slice(-20).join(' | ')}`)
  }
})

t.test('the unit tests catch a broken rule', async (t) => {
  // Count Breakwater's own refusals as the app's errors: the "only Breakwater refuses" case
  // must then see a page it should not.
  const dir = tempDir(t)
  for (const file of testFiles) copyFileSync(join(DIR, file), join(dir, file))
  const broken = readFileSync(join(DIR, RULES), 'utf8').replaceAll('{source="upstream", code=~"5.."}', '{code=~"5.."}')
  t.not(broken, readFileSync(join(DIR, RULES), 'utf8'), 'the rule was changed')
  writeFileSync(join(dir, RULES), broken)
  const result = await promtool(['test', 'rules', ...testFiles], { cwd: dir })
  t.not(result.code, 0, 'promtool test rules fails')
  t.match(result.output, /BreakwaterErrorBudgetBurnFast/, 'naming the alert that went wrong')
})

t.test('the alerts the runbook needs, each with severity, runbook and a firing test', async (t) => {
  const expected: Record<string, RegExp> = {
    BreakwaterCircuitOpen: /breakwater_circuit_state > 0/,
    BreakwaterKillSwitchActive: /breakwater_flag_killed == 1/,
    BreakwaterTriggerFired: /increase\(breakwater_trigger_fired_total\[5m\]\) > 0/,
    BreakwaterErrorBudgetBurnFast: /ratio_rate1h[\s\S]*ratio_rate5m[\s\S]*ratio_rate6h[\s\S]*ratio_rate30m/,
    BreakwaterErrorBudgetBurnSlow: /ratio_rate1d[\s\S]*ratio_rate2h[\s\S]*ratio_rate3d[\s\S]*ratio_rate6h/,
    BreakwaterNotificationsFailing: /breakwater_notifications_failed_total/,
    BreakwaterFleetDisconnected: /breakwater_fleet_connected == 0/
  }
  t.same(alerts.map((a) => a.alert).sort(), Object.keys(expected).sort(), 'exactly these alerts')

  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8')
  const headings = new Set([...readme.matchAll(/^#+ (.+)$/gm)].map((m) => (m[1] as string).trim()))
  const firing = new Set<string>()
  for (const file of testFiles) {
    const doc = parse(readFileSync(join(DIR, file), 'utf8')) as { tests: Array<{ alert_rule_test?: Array<{ alertname: string, exp_alerts: unknown[] }> }> }
    for (const test of doc.tests) for (const a of test.alert_rule_test ?? []) if (a.exp_alerts.length > 0) firing.add(a.alertname)
  }
  for (const a of alerts) {
    const name = a.alert as string
    t.match(a.expr, expected[name] ?? /./, `${name}: ${a.expr.replace(/\s+/g, ' ').slice(0, 80)}`)
    t.ok(['critical', 'warning', 'info'].includes(a.labels?.severity ?? ''), `${name}: severity ${a.labels?.severity ?? 'missing'}`)
    t.ok(a.annotations?.summary !== undefined && a.annotations?.description !== undefined, `${name}: summary and description`)
    const heading = /^README\.md, "(.+)"$/.exec(a.annotations?.runbook ?? '')?.[1]
    t.ok(heading !== undefined && headings.has(heading), `${name}: runbook points at README.md's "${heading ?? a.annotations?.runbook ?? ''}"`)
    t.match(a.annotations?.triage ?? '', /breakwater|dist\/cli\.js/, `${name}: says how to triage`)
    t.ok(firing.has(name), `${name}: a unit test sees it fire`)
  }
})

/** promtool check metrics prints one line per finding, starting with the metric's name. */
function breakwaterFindings (output: string): string[] {
  return output.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('breakwater_'))
}

t.test('a live sidecar\'s metrics pass promtool check metrics, and the rules read only real metrics', async (t) => {
  const up = await startUpstream((req, res) => {
    res.statusCode = req.url === '/fail' ? 500 : 200
    res.end('ok')
  })
  t.teardown(up.close)
  const { proxy, ops } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'echo', match: { pathPrefix: '/echo' }, upstream: 'app', killSwitch: 'enableEcho' },
      { match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { enableEcho: false },
    circuitBreakers: { app: {} },
    rollbackTriggers: [{ name: 'app-errors', metric: 'error_rate', threshold: 0.5, window: '1m', action: 'notify' }]
  })
  // Successes, app errors and a kill-switch refusal, so every family has samples.
  for (const path of ['/', '/a', '/fail', '/echo/x']) await send(proxy, path)
  const text = await (await fetch(`${ops}/metrics`)).text()

  const families = new Set([...text.matchAll(/^# TYPE (\S+) /gm)].map((m) => m[1] as string))
  const result = await promtool(['check', 'metrics'], { input: text })
  t.comment(`promtool check metrics (exit ${String(result.code)}): ${result.output.trim() === '' ? 'no findings' : result.output.trim()}`)
  t.same(breakwaterFindings(result.output), [], `no finding about any of the ${[...families].filter((f) => f.startsWith('breakwater_')).length} breakwater_* metrics`)
  t.notMatch(result.output, /error while linting|text format parsing error/i, 'the exposition parses')

  // And the filter above would see one: a gauge named like a counter.
  const bad = await promtool(['check', 'metrics'], { input: '# HELP breakwater_open_total Open things.\n# TYPE breakwater_open_total gauge\nbreakwater_open_total 1\n' })
  t.match(breakwaterFindings(bad.output), [/^breakwater_open_total /], 'a lint problem in a breakwater_* metric is reported')

  // breakwater_fleet_connected comes with the fleet feature (SPEC §16); the alert waits for it.
  const later = new Set(['breakwater_fleet_connected'])
  const used = new Set(rules.flatMap((r) => breakwaterMetrics(r.expr)))
  for (const name of used) {
    if (later.has(name)) continue
    t.ok(families.has(name), `${name} is exported`)
  }
})
