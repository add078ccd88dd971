"""What comes in over HTTP, bounded and checked before anything else sees it.

`guard` bounds slow and concurrent request bodies below the app (408, 429); `uploads` reads the bodies of
`POST /tasks` and `POST /predict` (streamed byte limits, multipart, archives, labels); `images` decodes and
validates the images themselves (pixel caps, formats). Every bad input is raised by its api.md code through
`service.errors.api_error`, so its status, message and headers come from the one `ERRORS` table.
"""
