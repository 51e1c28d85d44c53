/**
 * The fleet drill (`breakwater drill --fleet N`) as a user runs it: the real binary, a real
 * 3-member etcd and a real Alertmanager on loopback, N sidecars, a bad release. One rollback,
 * one Alertmanager notification while firing and one Slack message, PagerDuty event and
 * webhook call per event for the whole fleet, every sidecar reached by the fleet kill switch,
 * nothing lost with one etcd member, service restored; the exit code says so.
 */
import t from 'tap'
import { runCli, withoutTapHooks } from './helpers/process.js'

t.setTimeout(240_000)

t.test('breakwater drill --fleet 4: propagation to all, one rollback, one grouped alert, restored', async (t) => {
  const r = await runCli(['drill', '--fleet', '4'], { timeoutMs: 200_000, env: withoutTapHooks })
  const out = r.stdout
  t.equal(r.code, 0, `exit 0; stderr: ${r.stderr}; stdout: ${out}`)
  t.match(out, /in force on 4\/4 sidecars/, 'the fleet kill switch reached every sidecar')
  t.match(out, /from the admin API request: propagation p50 \d+ ms, p99 \d+ ms, max \d+ ms/)
  t.match(out, /from the CLI command \(breakwater kill newCheckout --fleet, in force on 4\/4\): propagation p50 \d+ ms, p99 \d+ ms, max \d+ ms/, 'timed from a spawned breakwater kill --fleet too')
  t.match(out, /Killed etcd member m2: 4\/4 sidecars still connected/)
  t.match(out, /rollback calls: 1 \(target 1\)/)
  t.match(out, /Alertmanager notifications while firing: 1 \(target 1; \d+ alerts grouped\), then 1 resolved/, 'one grouped notification while firing')
  t.match(out, /deliveries for the incident: Slack 3, PagerDuty 2, webhook 3 \(expected 3, 2, 3/, 'each channel told once per event, by one sidecar')
  t.match(out, /, all from the leader\n/)
  t.match(out, /Fleet restored \d+\.\d s after the bad release/)
  t.notMatch(out, /Drill FAILED/)
})

t.test('drill --fleet refuses a nonsense size', async (t) => {
  const r = await runCli(['drill', '--fleet', 'many'], { env: withoutTapHooks })
  t.equal(r.code, 2)
  t.match(r.stderr, /N is a number of sidecars from 1 to 200/)
})
