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

/** Fills in listen (port 0), stateDir and service unless given; accessLog on, drain 0. */
export async function startTestSidecar (t: Test, input: Record<string, unknown>, options: SidecarOptions = {}): Promise<TestSidecar> {
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-test-'))
  const raw = {
    service: 'test',
    version: '1.0.0',
    stateDir,
    listen: {
      proxy: { host: '127.0.0.1', port: 0 },
      ops: { host: '127.0.0.1', port: 0 },
      admin: { host: '127.0.0.1', port: 0 }
    },
    shutdown: { drainDelayMs: 0, timeoutMs: 2000 },
    ...input
  }
  const { config } = resolveConfig(raw)
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
