/**
 * Run the operator commands of the real binary (`breakwater status`, `kill`, ...) against
 * sidecars started with `startProcess`. Each run gets an empty working directory (so no
 * `config/breakwater.yaml` is picked up by accident) and an environment without
 * `BREAKWATER_CONFIG` or `BREAKWATER_ADMIN_TOKEN` unless the test sets them.
 */
import type { Test } from 'tap'
import { runCli, startProcessWithin, tempDir, withoutTapHooks, type CliResult, type Running } from './process.js'
import { startUpstream, type TestUpstream } from './upstream.js'
import { admin } from './admin.js'

export type Operator = (args: string[], env?: NodeJS.ProcessEnv) => Promise<CliResult>

export function operator (t: Test): Operator {
  const cwd = tempDir(t)
  return async (args, env = {}) => await runCli(args, {
    cwd,
    env: { BREAKWATER_CONFIG: undefined, BREAKWATER_ADMIN_TOKEN: undefined, ...env },
    timeoutMs: 60_000
  })
}

/** The admin URL from a started process's `listening` line, always on 127.0.0.1. */
export function adminUrl (running: Running): string {
  const line = running.lines.find((l) => l.msg === 'listening')
  if (line === undefined) throw new Error('the process has not logged its listening line')
  return String(line.admin).replace('://0.0.0.0:', '://127.0.0.1:').replace('://[::]:', '://127.0.0.1:')
}

/** A Node stack frame (`    at fn (file.js:1:2)`), which an operator should never see. */
export const STACK_FRAME = /^\s+at .+:\d+:\d+\)?$/m

/** Parse the whole of stdout as one JSON document, or fail with what was printed. */
export function parseOnlyJson (result: CliResult): any {
  try {
    return JSON.parse(result.stdout)
  } catch (err) {
    throw new Error(`stdout is not only JSON (${(err as Error).message}): ${JSON.stringify(result.stdout)}; stderr: ${result.stderr}`)
  }
}

/** Run several commands, at most `limit` at a time; results in the order given. */
export async function runAll (run: Operator, commands: Array<{ args: string[], env?: NodeJS.ProcessEnv }>, limit = 4): Promise<CliResult[]> {
  const results: CliResult[] = new Array(commands.length)
  let next = 0
  const worker = async (): Promise<void> => {
    while (next < commands.length) {
      const i = next++
      const c = commands[i] as { args: string[], env?: NodeJS.ProcessEnv }
      results[i] = await run(c.args, c.env)
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, commands.length) }, worker))
  return results
}

/**
 * Start the real binary on `config` (see `startProcess`), without tap's per-process hooks and
 * with a start-up deadline that suits a busy machine.
 */
export async function startSidecarProcess (t: Test, config: Record<string, unknown>, env: NodeJS.ProcessEnv = {}, timeoutMs = 60_000): Promise<Running> {
  return await startProcessWithin(t, config, timeoutMs, { ...withoutTapHooks, ...env })
}

// ---- the fixture both operator CLI test files share ----

export const TOKEN = 'operator-cli-test-token-0123456789'
export const FLAG = 'enableNewCheckout'

export function config (up: TestUpstream): Record<string, unknown> {
  return {
    upstreams: { app: { url: up.url }, pay: { url: up.url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: FLAG },
      { name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { [FLAG]: true, unrelated: true },
    circuitBreakers: { pay: { volumeThreshold: 2, recoveryTimeout: 60_000 } },
    shutdown: { drainDelayMs: 0, timeoutMs: 2000 }
  }
}

export interface Fixture {
  up: TestUpstream
  s: Running
  url: string
}

/** A real upstream and a sidecar process whose admin token is TOKEN (from the environment). */
export async function fixture (t: Test): Promise<Fixture> {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startSidecarProcess(t, config(up), { BREAKWATER_ADMIN_TOKEN: TOKEN })
  return { up, s, url: adminUrl(s) }
}

export const withToken = { BREAKWATER_ADMIN_TOKEN: TOKEN }

export async function state (url: string, token = TOKEN): Promise<any> {
  const r = await admin(url, 'GET', '/v1/state', undefined, token)
  if (r.status !== 200) throw new Error(`GET /v1/state: ${r.status} ${JSON.stringify(r.body)}`)
  return r.body
}

export async function auditEntries (url: string, token = TOKEN): Promise<any[]> {
  const r = await admin(url, 'GET', '/v1/audit?limit=100', undefined, token)
  if (r.status !== 200) throw new Error(`GET /v1/audit: ${r.status} ${JSON.stringify(r.body)}`)
  return r.body.entries as any[]
}
