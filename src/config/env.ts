/**
 * `${NAME}` and `${NAME:-default}` expansion in every string of a parsed config.
 * `$${...}` is left as a literal `${...}`. A variable that is unset or empty (and has no
 * default, as the shell's `:-`) is a problem reported with the key path where it was used,
 * saying which of the two it is.
 */
const REFERENCE = /\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}/g

export function expandEnv (value: unknown, env: NodeJS.ProcessEnv, problems: string[], path = ''): unknown {
  if (typeof value === 'string') {
    if (!value.includes('${')) return value
    return value.replace(REFERENCE, (whole: string, escaped: string, name: string, fallback: string | undefined) => {
      if (escaped === '$') return whole.slice(1)
      const found = env[name]
      if (found !== undefined && found !== '') return found
      if (fallback !== undefined) return fallback
      problems.push(`${path || '(root)'}: environment variable ${name} is ${found === '' ? 'empty (set, but to nothing)' : 'not set'}`)
      return ''
    })
  }
  if (Array.isArray(value)) return value.map((item, i) => expandEnv(item, env, problems, `${path}[${i}]`))
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {}
    for (const [key, item] of Object.entries(value)) out[key] = expandEnv(item, env, problems, path === '' ? key : `${path}.${key}`)
    return out
  }
  return value
}
