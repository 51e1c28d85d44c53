/**
 * An in-process sidecar started from a real config file (so `POST /v1/reload` re-reads it):
 * `testSidecarInput`'s defaults, state in a temp dir, log lines captured as parsed objects.
 */
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { loadConfigFile } from '../../src/config/load.js'
import { startCaptured, testSidecarInput, type TestSidecar } from './sidecar.js'

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
    writeFileSync(configPath, JSON.stringify(testSidecarInput(next, stateDir), null, 2))
  }
  rewrite(input)
  const { config } = await loadConfigFile(configPath)
  return { ...(await startCaptured(t, config, dir)), configPath, rewrite }
}
