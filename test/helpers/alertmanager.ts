/**
 * A real Alertmanager (Debian package `prometheus-alertmanager`; `.ci/run` installs it when
 * missing) on a loopback port, in a temp storage dir, routing every alert to a webhook receiver
 * (a local HTTP server that records Alertmanager's notifications). Stopped in teardown.
 */
import type { Test } from 'tap'
import type { ChildProcess } from 'node:child_process'
import { startLocalAlertmanager } from '../../src/fleet/local.js'
import { startReceiver, type Receiver } from './receiver.js'

export interface TestAlertmanager {
  url: string
  /** Alertmanager's webhook notifications (`POST /alertmanager`). */
  hook: Receiver
  proc: ChildProcess
}

/** `global`: Alertmanager's global settings (`resolve_timeout`). */
export async function startAlertmanager (t: Test, route: Record<string, unknown> = {}, global: Record<string, unknown> = {}): Promise<TestAlertmanager> {
  const hook = await startReceiver([200])
  t.teardown(hook.close)
  const am = await startLocalAlertmanager(`${hook.url}/alertmanager`, route, global)
  t.teardown(am.close)
  return { url: am.url, hook, proc: am.proc }
}
