/* mdopt: symbol visibility for the shared library. */
#ifndef MDOPT_EXPORT_H_
#define MDOPT_EXPORT_H_

#if defined(MDOPT_BUILDING_LIBRARY) && defined(__GNUC__)
#define MDOPT_API __attribute__((visibility("default")))
#else
#define MDOPT_API
#endif

#endif /* MDOPT_EXPORT_H_ */
