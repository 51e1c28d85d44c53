/**
 * An in-process sidecar started from a real config file (so `POST /v1/reload` re-reads it):
 * listeners on 127.0.0.1 port 0, state in a temp dir, log lines captured as parsed objects.
 */
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { loadConfigFile } from '../../src/config/load.js'
import { startCaptured, type TestSidecar } from './sidecar.js'

export interface FileSidecar extends TestSidecar {
  configPath: string
  /** Replace the config file's contents (the same defaults are filled in). */
  rewrite: (input: Record<string, unknown>) => void
}

export async function startFileSidecar (t: Test, input: Record<string, unknown>): Promise<FileSidecar> {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-file-'))
  const stateDir = join(dir, 'state')
  const configPath = join(dir, 'breakwater.json')
  const rewrite = (next: Record<string, unknown>): void => {
    writeFileSync(configPath, JSON.stringify({
      service: 'test',
      version: '1.0.0',
      stateDir,
      listen: {
        proxy: { host: '127.0.0.1', port: 0 },
        ops: { host: '127.0.0.1', port: 0 },
        admin: { host: '127.0.0.1', port: 0 }
      },
      shutdown: { drainDelayMs: 0, timeoutMs: 2000 },
      ...next
    }, null, 2))
  }
  rewrite(input)
  const { config } = await loadConfigFile(configPath)
  return { ...(await startCaptured(t, config, dir)), configPath, rewrite }
}
