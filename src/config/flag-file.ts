/**
 * The flagd flag file format (https://flagd.dev/reference/flag-definitions/): the file named by
 * `flagSource.path` is configuration input, read here both by the loader (to check that every
 * `killSwitch` names a defined flag) and by the flag source that serves and watches it.
 *
 * Semantics, as flagd's own:
 * - `state: ENABLED` with a boolean `defaultVariant` gives that value;
 * - `state: DISABLED` — or no `defaultVariant` — resolves to the *code default*: for
 *   Breakwater the `featureFlags` value, else `true` (feature on). A DISABLED flag does not
 *   switch a feature off; `defaultVariant: "off"` does (`validate` warns about it);
 * - an ENABLED flag with `targeting` is evaluated per request by flagd-core itself (the flag
 *   source compiles `text` when a file has such a flag); every other flag is a snapshot read;
 * - flags whose variants are not booleans are someone else's and are ignored — unless the
 *   config uses them (a kill switch, a fault or trigger flag): then the file is refused, since
 *   `"off": "false"` (a string) would never switch anything off (`notBoolean`).
 */
import { readFileSync } from 'node:fs'

export interface FileFlags {
  /** Boolean value of each ENABLED flag with a boolean default variant. */
  values: Map<string, boolean>
  /** Flags present but resolving to the code default (DISABLED, or no default variant). */
  disabled: Set<string>
  /** ENABLED flags with targeting rules: their value depends on the request. */
  targeted: Set<string>
  /** Flags whose variants are not all booleans (not read as flags of Breakwater's). */
  notBoolean: Set<string>
  /** The file's text, which flagd-core compiles when `targeted` is not empty. */
  text: string
}

export type FlagFileRead =
  | { kind: 'ok', flags: FileFlags }
  | { kind: 'missing' }
  | { kind: 'invalid', error: string }

/** Parse flagd JSON text. Throws with a message naming what is wrong. */
export function parseFlagFile (text: string): FileFlags {
  let doc: unknown
  try {
    doc = JSON.parse(text)
  } catch (err) {
    throw new Error(`not valid JSON: ${(err as Error).message}`)
  }
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) throw new Error('must be a JSON object')
  const flags = (doc as { flags?: unknown }).flags
  if (flags === null || typeof flags !== 'object' || Array.isArray(flags)) throw new Error('flags: must be an object')
  const out: FileFlags = { values: new Map(), disabled: new Set(), targeted: new Set(), notBoolean: new Set(), text }
  for (const [key, def] of Object.entries(flags as Record<string, unknown>)) {
    if (def === null || typeof def !== 'object') throw new Error(`flags.${key}: must be an object`)
    const { state, variants, defaultVariant, targeting } = def as Record<string, unknown>
    if (state !== 'ENABLED' && state !== 'DISABLED') throw new Error(`flags.${key}.state: must be "ENABLED" or "DISABLED"`)
    if (variants === null || typeof variants !== 'object' || Array.isArray(variants) || Object.keys(variants).length === 0) {
      throw new Error(`flags.${key}.variants: must be a non-empty object`)
    }
    const values = Object.values(variants as Record<string, unknown>)
    if (!values.every((v) => typeof v === 'boolean')) { out.notBoolean.add(key); continue } // not a boolean flag
    // Its own variants only: `in` also finds `constructor` or `toString` on every object, whose
    // value (a function) is no boolean, so such a kill switch would resolve to on.
    if (defaultVariant !== undefined && defaultVariant !== null && (typeof defaultVariant !== 'string' || !Object.hasOwn(variants, defaultVariant))) {
      throw new Error(`flags.${key}.defaultVariant: must name one of its variants`)
    }
    // flagd-core's own test for "has targeting": a non-empty rule.
    if (state === 'ENABLED' && targeting !== undefined && targeting !== null && Object.keys(targeting as object).length > 0) {
      out.targeted.add(key)
      continue
    }
    if (state === 'DISABLED' || defaultVariant === undefined || defaultVariant === null) {
      out.disabled.add(key)
      continue
    }
    out.values.set(key, (variants as Record<string, boolean>)[defaultVariant as string] as boolean)
  }
  return out
}

export function readFlagFileSync (path: string): FlagFileRead {
  let text: string
  try {
    text = readFileSync(path, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { kind: 'missing' }
    return { kind: 'invalid', error: (err as Error).message }
  }
  try {
    return { kind: 'ok', flags: parseFlagFile(text) }
  } catch (err) {
    return { kind: 'invalid', error: (err as Error).message }
  }
}

/** What a config reads flags for, as written (absent keys) or as built (nulls). */
interface FlagReaders {
  routes: ReadonlyArray<{ killSwitch?: string | null, fault?: { flag?: string | null } | null }>
  rollbackTriggers: ReadonlyArray<{ flags?: readonly string[] | null }>
}

/** The flag keys a config reads: kill switches, fault flags, trigger flags. */
export function flagKeysRead (config: FlagReaders): Set<string> {
  const keys = new Set<string>()
  for (const r of config.routes) {
    if (typeof r.killSwitch === 'string') keys.add(r.killSwitch)
    if (typeof r.fault?.flag === 'string') keys.add(r.fault.flag)
  }
  for (const t of config.rollbackTriggers) if (t.flags != null) for (const f of t.flags) keys.add(f)
  return keys
}

/**
 * The problem with a file that gives a flag the config uses (`used`) variants that are not
 * booleans, or null: such a flag would silently resolve to its code default, and a kill switch
 * turned "off" in it would never switch anything off.
 */
export function notBooleanProblem (flags: FileFlags, used: Iterable<string>): string | null {
  const bad = [...used].filter((key) => flags.notBoolean.has(key))
  if (bad.length === 0) return null
  return `${bad.map((k) => `flags.${k}.variants`).join(', ')}: must be true and false (booleans, not strings): ${bad.length === 1 ? 'this flag is' : 'these flags are'} used by the config (a kill switch, a fault or trigger flag) and would never switch anything off`
}
