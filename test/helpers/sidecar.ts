/**
 * Start a real sidecar in-process for a test: every listener on 127.0.0.1 port 0, state in a
 * temp dir, log lines captured as parsed objects. Closed in the test's teardown.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import type { Test } from 'tap'
import { resolveConfig } from '../../src/config/load.js'
import { startSidecar, type Sidecar, type SidecarOptions } from '../../src/sidecar.js'
import type { Config } from '../../src/config/types.js'

/** The admin token every in-process test sidecar uses. */
export const TEST_TOKEN = 'test-admin-token-0123456789abcdef'

export interface TestSidecar {
  sidecar: Sidecar
  proxy: string
  ops: string
  admin: string
  proxyPort: number
  logs: Array<Record<string, unknown>>
  stateDir: string
}

/**
 * The raw config an in-process test sidecar starts from: listen (port 0), `stateDir`, service and
 * version filled in unless `input` gives them; drain 0. Shedding on event-loop delay is off
 * unless `input.limits` sets it: in-process the sidecar shares its loop with the test's own
 * clients, so a busy machine stalling the test process for a second would shed the test's
 * requests for the harness's lateness, not the sidecar's. (A test that seeds state by config
 * hash hashes this.)
 */
export function testSidecarInput (input: Record<string, unknown>, stateDir: string): Record<string, unknown> {
  return {
    service: 'test',
    version: '1.0.0',
    stateDir,
    listen: {
      proxy: { host: '127.0.0.1', port: 0 },
      ops: { host: '127.0.0.1', port: 0 },
      admin: { host: '127.0.0.1', port: 0 }
    },
    shutdown: { drainDelayMs: 0, timeoutMs: 2000 },
    ...input,
    limits: { maxEventLoopDelayMs: 0, ...(input.limits as Record<string, unknown> | undefined) }
  }
}

/** Start `testSidecarInput(input)` in-process; its temp state dir is removed in teardown. */
export async function startTestSidecar (t: Test, input: Record<string, unknown>, options: SidecarOptions = {}): Promise<TestSidecar> {
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-test-'))
  const { config } = resolveConfig(testSidecarInput(input, stateDir))
  return await startCaptured(t, config, stateDir, options)
}

/** Start `config` in-process with its log lines captured; closed (and `dir` removed) in teardown. */
export async function startCaptured (t: Test, config: Config, dir: string, options: SidecarOptions = {}): Promise<TestSidecar> {
  const logs: Array<Record<string, unknown>> = []
  const destination = new Writable({
    write (chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) if (line !== '') logs.push(JSON.parse(line) as Record<string, unknown>)
      cb()
    }
  })
  const sidecar = await startSidecar(config, { ...options, logDestination: destination, adminToken: TEST_TOKEN })
  t.teardown(async () => {
    await sidecar.close()
    rmSync(dir, { recursive: true, force: true })
  })
  return {
    sidecar,
    proxy: sidecar.addresses.proxy,
    ops: sidecar.addresses.ops,
    admin: sidecar.addresses.admin,
    proxyPort: Number(new URL(sidecar.addresses.proxy).port),
    logs,
    stateDir: config.stateDir
  }
}

/** A minimal config input: one upstream `app`, one catch-all route. */
export function oneRoute (url: string, route: Record<string, unknown> = {}, upstream: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    upstreams: { app: { url, ...upstream } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', ...route }]
  }
}
