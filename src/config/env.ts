/**
 * `${NAME}` and `${NAME:-default}` expansion in every string of a parsed config.
 * `$${` is a literal `${`. A variable that is unset or empty (and has no default, as the
 * shell's `:-`) is a problem reported with the key path where it was used, saying which of the
 * two it is. Any other `${` (the shell's `${NAME-default}` or `${NAME:?}`, a name starting with
 * a digit, a reference never closed, one nested in a default) is a problem too: left as it was
 * written it would reach an upstream URL or a header as literal text. Except in free text that
 * another reader expands or shows as written (`FREE_TEXT`): an exec rollback's argv, whose shell
 * reads `${1}` or `${VAR%.*}`, and a static fallback's body (a page's own script).
 */
const REFERENCE = /\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{/g

/** Keys whose value keeps a `${` that is no reference as it is. */
const FREE_TEXT = /^(?:rollback\.command\[\d+\]|routes\[\d+\]\.fallback\.body)$/

/** What a `${` at `at` that is no reference is called in a problem: its name part only (the rest may be a secret). */
function unexpanded (value: string, at: number): string {
  const head = value.slice(at).replace(/^(\$\{[A-Za-z0-9_]*.?)[^]*$/, '$1')
  return `"${head}${head.endsWith('}') || at + head.length === value.length ? '' : '…'}" (character ${at + 1}) is not a reference Breakwater expands: write \${NAME} or \${NAME:-default} (a name of letters, digits and _, not starting with a digit; no other shell form, no nesting), or $\${ for a literal \${`
}

export function expandEnv (value: unknown, env: NodeJS.ProcessEnv, problems: string[], path = ''): unknown {
  if (typeof value === 'string') {
    if (!value.includes('${')) return value
    return value.replace(REFERENCE, (whole: string, name: string | undefined, fallback: string | undefined, at: number) => {
      if (whole === '$${') return '${'
      if (name === undefined || fallback?.includes('${') === true) {
        if (FREE_TEXT.test(path)) return whole
        problems.push(`${path || '(root)'}: ${unexpanded(value, at)}`)
        return whole
      }
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
