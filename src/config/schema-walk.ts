/**
 * A walk over a value beside its schema, for what a JSON schema validator does not do: fill
 * in defaults (`default:` keywords) and find every duration (to bound it). A union walks into
 * the member the value matches; a value the schema refused is left as it is.
 */
import { Value } from '@sinclair/typebox/value'
import type { TSchema } from '@sinclair/typebox'

/** Sees each node before its children and returns its (possibly replaced) value. */
export type Visit = (schema: TSchema, value: unknown, at: string) => unknown

/** `value` rebuilt with `visit` applied at every node; `at` is the key path (`routes[0].match`). */
export function walk (schema: TSchema, value: unknown, at: string, visit: Visit): unknown {
  const v = visit(schema, value, at)
  if (schema.anyOf !== undefined) {
    const member = (schema.anyOf as TSchema[]).find((m) => Value.Check(m, v))
    return member === undefined ? v : walk(member, v, at, visit)
  }
  if (Array.isArray(v)) {
    const items = schema.items as TSchema | undefined
    return items === undefined ? v : v.map((item, i) => walk(items, item, `${at}[${i}]`, visit))
  }
  if (v === null || typeof v !== 'object' || schema.type !== 'object') return v
  const properties = (schema.properties ?? {}) as Record<string, TSchema>
  const pattern = Object.values((schema.patternProperties ?? {}) as Record<string, TSchema>)[0]
  const out: Record<string, unknown> = { ...(v as Record<string, unknown>) }
  for (const [key, child] of Object.entries(properties)) {
    const next = walk(child, out[key], at === '' ? key : `${at}.${key}`, visit)
    if (next !== undefined) out[key] = next
  }
  if (pattern !== undefined) {
    for (const key of Object.keys(out)) if (properties[key] === undefined) out[key] = walk(pattern, out[key], at === '' ? key : `${at}.${key}`, visit)
  }
  return out
}

/** `value` with every absent key that declares a `default` filled in (a copy). */
export function withDefaults (schema: TSchema, value: unknown): unknown {
  return walk(schema, value, '', (s, v) => v === undefined && s.default !== undefined ? structuredClone(s.default) : v)
}

/**
 * Keys written without a key they need (an object schema's `dependencies`: `failbackAfter`
 * needs `failover`). Checked on the config as written, before defaults are filled in, since
 * a default must not count as written.
 */
export function dependencyProblems (schema: TSchema, value: unknown): string[] {
  const problems: string[] = []
  walk(schema, value, '', (s, v, at) => {
    const dependencies = s.dependencies as Record<string, string[]> | undefined
    if (dependencies === undefined || v === null || typeof v !== 'object') return v
    const given = v as Record<string, unknown>
    for (const [key, needs] of Object.entries(dependencies)) {
      if (given[key] === undefined) continue
      for (const need of needs) if (given[need] === undefined) problems.push(`${at === '' ? '' : `${at}.`}${key}: needs ${need}`)
    }
    return v
  })
  return problems
}
