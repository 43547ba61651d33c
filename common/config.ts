/** Service configuration files: JSON, checked against a zod schema, errors naming the field. */
import fs from 'node:fs';
import type { z } from 'zod';

export function readJsonConfig<S extends z.ZodTypeAny>(file: string, schema: S, what: string): z.infer<S> {
  const result = schema.safeParse(JSON.parse(fs.readFileSync(file, 'utf8')));
  if (!result.success) {
    throw new Error(`invalid ${what} config ${file}: ${result.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  }
  return result.data;
}
