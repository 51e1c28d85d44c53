/**
 * Writes `config/breakwater.schema.json` from the TypeBox schema (`npm run schema`).
 * A test fails when the committed file drifts from the code.
 */
import { writeFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { ConfigSchema } from './schema.js'

export function schemaJson (): string {
  return JSON.stringify({ $schema: 'http://json-schema.org/draft-07/schema#', ...ConfigSchema }, null, 2) + '\n'
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  const target = fileURLToPath(new URL('../../config/breakwater.schema.json', import.meta.url))
  writeFileSync(target, schemaJson())
  process.stdout.write(`wrote ${target}\n`)
}
