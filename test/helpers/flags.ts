/**
 * flagd flag files for tests: boolean kill-switch flags (`on`/`off` variants), with or without
 * targeting, in a temp dir removed in teardown.
 */
import { mkdtempSync, rmSync, writeFileSync, renameSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'

export interface FlagDef {
  state?: 'ENABLED' | 'DISABLED'
  defaultVariant?: 'on' | 'off' | null
  targeting?: unknown
}

/** The text of a flagd flag file. */
export function flagdText (flags: Record<string, FlagDef>, evaluators?: Record<string, unknown>): string {
  return JSON.stringify({
    $schema: 'https://flagd.dev/schema/v0/flags.json',
    flags: Object.fromEntries(Object.entries(flags).map(([key, f]) => [key, {
      state: f.state ?? 'ENABLED',
      variants: { on: true, off: false },
      defaultVariant: f.defaultVariant === undefined ? 'on' : f.defaultVariant,
      ...(f.targeting === undefined ? {} : { targeting: f.targeting })
    }])),
    ...(evaluators === undefined ? {} : { $evaluators: evaluators })
  }, null, 2)
}

/** Write atomically (a rename), so a poller never reads half a file. */
export function writeFlagFile (path: string, flags: Record<string, FlagDef>, evaluators?: Record<string, unknown>): void {
  writeFileSync(`${path}.tmp`, flagdText(flags, evaluators))
  renameSync(`${path}.tmp`, path)
}

export function flagDir (t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-flags-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** Upstream `app`; route `checkout` (`/checkout`) guarded by `enableNewCheckout`, then a catch-all. */
export function checkoutRoutes (url: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    upstreams: { app: { url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'enableNewCheckout' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    ...extra
  }
}
