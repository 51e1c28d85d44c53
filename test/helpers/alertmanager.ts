/**
 * A real Alertmanager (Debian package `prometheus-alertmanager`; `.ci/run` installs it when
 * missing) on a loopback port, in a temp storage dir, routing every alert to a webhook receiver
 * (a local HTTP server that records Alertmanager's notifications). Stopped in teardown.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { stringify } from 'yaml'
import { startReceiver, type Receiver } from './receiver.js'
import { freePort, stopProcess } from './services.js'
import { eventually } from './http.js'

export const ALERTMANAGER_MISSING = 'alertmanager not found: install it with `apt-get install -y prometheus-alertmanager` (.ci/run does)'

export interface TestAlertmanager {
  url: string
  /** Alertmanager's webhook notifications (`POST /alertmanager`). */
  hook: Receiver
  proc: ChildProcess
}

/** The binary's name on this machine: Debian's, or upstream's. */
function binary (): string {
  for (const name of ['prometheus-alertmanager', 'alertmanager']) {
    if (spawnSync(name, ['--version']).error === undefined) return name
  }
  throw new Error(ALERTMANAGER_MISSING)
}

export async function startAlertmanager (t: Test, route: Record<string, unknown> = {}): Promise<TestAlertmanager> {
  const hook = await startReceiver([200])
  t.teardown(hook.close)
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-am-'))
  writeFileSync(join(dir, 'alertmanager.yml'), stringify({
    route: { receiver: 'hook', group_by: ['alertname', 'service', 'trigger'], group_wait: '3s', group_interval: '2s', repeat_interval: '1h', ...route },
    receivers: [{ name: 'hook', webhook_configs: [{ url: `${hook.url}/alertmanager`, send_resolved: true }] }]
  }))
  const name = binary()
  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    let output = ''
    const proc = spawn(name, [
      `--config.file=${join(dir, 'alertmanager.yml')}`,
      `--storage.path=${join(dir, 'data')}`,
      `--web.listen-address=127.0.0.1:${port}`,
      '--cluster.listen-address=',
      '--log.level=warn'
    ], { stdio: ['ignore', 'pipe', 'pipe'] })
    proc.stdout.on('data', (c: Buffer) => { output = (output + c.toString('utf8')).slice(-4000) })
    proc.stderr.on('data', (c: Buffer) => { output = (output + c.toString('utf8')).slice(-4000) })
    const url = `http://127.0.0.1:${port}`
    const ready = await eventually(async () => {
      if (proc.exitCode !== null) return true
      const res = await fetch(`${url}/-/ready`).catch(() => null)
      return res?.status === 200
    }, 30_000, 50)
    if (ready && proc.exitCode === null) {
      t.teardown(async () => {
        await stopProcess(proc)
        rmSync(dir, { recursive: true, force: true })
      })
      return { url, hook, proc }
    }
    await stopProcess(proc)
    // A port taken between freePort() and Alertmanager's bind: another port.
    if (!/address already in use/.test(output) || attempt === 3) {
      rmSync(dir, { recursive: true, force: true })
      throw new Error(`alertmanager did not become ready: ${output}`)
    }
  }
}
