"""steering lab: the web app (also the Hugging Face Space entry point). See README.md."""

from steering_lab.ui.app import main

if __name__ == "__main__":
    main()
