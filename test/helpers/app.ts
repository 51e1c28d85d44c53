/**
 * A controllable application upstream for triage, verification and fault tests: by path
 * prefix it answers 500 (`failing`) or never (`hanging`); everything else gets a JSON 200
 * after `delayMs`. The sets and the delay may be changed while traffic flows ("a bad release",
 * "the fix").
 */
import type { Test } from 'tap'
import { startUpstream, type TestUpstream } from './upstream.js'

export interface App extends TestUpstream {
  /** Path prefixes answered with 500. */
  failing: Set<string>
  /** Path prefixes never answered. */
  hanging: Set<string>
  /** Milliseconds to wait before every other answer. */
  delayMs: number
}

export async function startApp (t: Test, options: { failing?: string[], hanging?: string[], delayMs?: number } = {}): Promise<App> {
  const control = { failing: new Set(options.failing ?? []), hanging: new Set(options.hanging ?? []), delayMs: options.delayMs ?? 0 }
  const up = await startUpstream((req, res) => {
    const url = req.url ?? '/'
    const has = (set: Set<string>): boolean => [...set].some((p) => url.startsWith(p))
    if (has(control.hanging)) return
    const answer = (): void => {
      if (res.destroyed) return
      if (has(control.failing)) {
        res.writeHead(500, { 'content-type': 'application/json' })
        res.end('{"error":"boom"}')
        return
      }
      const body = JSON.stringify({ ok: true, url })
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
      res.end(body)
    }
    if (control.delayMs > 0) setTimeout(answer, control.delayMs)
    else answer()
  })
  t.teardown(up.close)
  const app = up as App
  Object.defineProperty(app, 'failing', { value: control.failing, enumerable: true })
  Object.defineProperty(app, 'hanging', { value: control.hanging, enumerable: true })
  Object.defineProperty(app, 'delayMs', { get: () => control.delayMs, set: (v: number) => { control.delayMs = v }, enumerable: true })
  return app
}

/** Split a command line as triage prints it (words, and JSON-quoted strings) into argv. */
export function splitCommand (command: string): string[] {
  const out: string[] = []
  for (const m of command.matchAll(/"((?:[^"\\]|\\.)*)"|(\S+)/g)) {
    out.push(m[1] !== undefined ? JSON.parse(`"${m[1]}"`) as string : m[2] as string)
  }
  return out
}
